"""Worker: trains (or resumes) a config with the real Trainer and records, per rank, every
training sample whose loss counted: ``RECORD_DIR/rank<r>.<run>.jsonl`` lines
``{"step": global step, "epoch": e, "indices": [...]}``.

Usage: resize_resume.py CONFIG RECORD_DIR RUN_NAME [--resume] [--steps N]
"""

import json
import sys
from pathlib import Path

import pybrain_mpi as pbm
from pybrain_mpi.config import load_config
from pybrain_mpi.trainer import Trainer

if __name__ == "__main__":
    config_path, record_dir, run_name, *rest = sys.argv[1:]
    steps = int(rest[rest.index("--steps") + 1]) if "--steps" in rest else None
    pbm.init()
    trainer = Trainer(load_config(config_path), resume="--resume" in rest, max_steps=steps,
                      progress=False)
    path = Path(record_dir) / f"rank{pbm.rank()}.{run_name}.jsonl"
    records = open(path, "w")
    original = trainer._batch_for

    def recording(epoch, in_epoch):
        read, used, weight = original(epoch, in_epoch)
        records.write(json.dumps({"step": trainer.step, "epoch": epoch, "weight": weight,
                                  "indices": [int(i) for i in used]}) + "\n")
        return read, used, weight

    trainer._batch_for = recording
    trainer.fit()
    records.close()
    pbm.shutdown()
