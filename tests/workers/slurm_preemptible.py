"""Worker for tests/test_slurm.py: a stand-in training loop that obeys Slurm preemption.

Launched by slurm/train.sbatch (PBM_COMMAND) as ``slurm_preemptible.py STATE_DIR [--resume]``.
Each "step" allreduces a value known in closed form, so the final total proves no step was lost
or repeated across a requeue. On SIGUSR1 or SIGTERM the ranks agree at the next step boundary
(max-allreduce of the flag), rank 0 writes a checkpoint atomically (temp file + rename), and all
exit 0; with ``--resume`` a later run continues from that checkpoint. This is the protocol the
real trainer follows; here it tests the template's signal forwarding and requeue.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import pybrain_mpi as pbm

STEPS = 24
STEP_SLEEP_S = 0.1
RUNNING_AFTER_STEP = 3   # rank 0 announces it is running (a file) once past this step

_stop_requested = False


def _request_stop(signum: int, _frame) -> None:
    global _stop_requested
    _stop_requested = True


def expected_total(size: int, steps: int) -> float:
    """Sum over steps s < steps and ranks r of (r + 1) * (s + 1)."""
    return size * (size + 1) / 2 * steps * (steps + 1) / 2


def main() -> int:
    state_dir = Path(sys.argv[1])
    resume = "--resume" in sys.argv[2:]
    signal.signal(signal.SIGUSR1, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    pbm.init()
    rank, size = pbm.rank(), pbm.size()
    checkpoint = state_dir / "checkpoint.json"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

    step, total = 0, 0.0
    if resume and checkpoint.exists():
        saved = json.loads(checkpoint.read_text())
        step, total = saved["step"], saved["total"]
        if rank == 0:
            print(f"PBM_WORKER resumed at step {step} (restart {restarts})", flush=True)
    elif rank == 0:
        print(f"PBM_WORKER fresh start (restart {restarts})", flush=True)

    while step < STEPS:
        value = np.array([(rank + 1.0) * (step + 1.0)])
        total += float(pbm.allreduce(value, op="sum")[0])
        step += 1
        # Every rank must stop at the same step, or the survivors would block in the next
        # collective: agree on "anyone was signalled".
        stop = pbm.allreduce(np.array([1.0 if _stop_requested else 0.0]), op="max")[0] > 0
        if rank == 0 and step == RUNNING_AFTER_STEP:
            (state_dir / f"running.{restarts}").write_text(str(step))
        if stop:
            if rank == 0:
                temporary = checkpoint.with_suffix(".tmp")
                temporary.write_text(json.dumps({"step": step, "total": total}))
                os.replace(temporary, checkpoint)
                print(f"PBM_WORKER preempted: checkpoint at step {step}", flush=True)
            pbm.shutdown()
            return 0
        time.sleep(STEP_SLEEP_S)

    if rank == 0:
        want = expected_total(size, STEPS)
        verdict = "OK" if total == want else "WRONG"
        print(f"PBM_WORKER finished {STEPS} steps: total {total} expected {want} {verdict}", flush=True)
        (state_dir / "result.json").write_text(json.dumps({"total": total, "expected": want,
                                                           "restarts": restarts}))
    pbm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
