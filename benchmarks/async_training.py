"""Downpour SGD (1 server + N-1 workers) against synchronous DDP (N ranks), in the same run:
held-out R^2 against wall time, and the time each takes to reach the synchronous run's final R^2.

    python benchmarks/async_training.py                      # 4 ranks, 3 repeats, +- a straggler
    python benchmarks/async_training.py --ranks 4 --epochs 3 --repeats 5 --delay 0.02
    python benchmarks/async_training.py --quick              # 3 ranks, 1 epoch, 1 repeat (smoke)

Data and model: examples/dca_fmri.toml (DCA, hidden 64, on nitime's two real fMRI runs shipped
with the nitime package: every voxel's 40-point series, 20% of the voxels held out), trained
through the real trainer (``pybrain_mpi.trainer.Trainer``) with ``[train] mode`` "sync" or
"downpour" (``servers = 1``, ``fetch_every = push_every = 1``, ``--server-optimizer``, default
the mode's Adagrad; the sync run uses the example's Adam. Measured on a shared 2-core machine, 4
ranks, 1 epoch: Adam on the server reached a held-out R^2 ratio of 0.25 to sync, Adagrad 0.91); time budget, early stopping and
periodic checkpoints off, ``--epochs`` epochs. Each mode runs on the same N ranks.

Every ``--eval-every`` steps rank 0 (sync) or worker 0 (downpour: the parameters it just fetched,
which are the server's at that moment) snapshots the model with the time since its first step;
and after its last step; after training those snapshots are evaluated on the held-out voxels
off the clock (downpour's last one is worker 0's last fetch, which may miss the other workers'
final pushes; its final R^2 is the servers' final model's). With
``--delay S`` one rank (the last: a worker in downpour) sleeps S seconds after each of its
steps, a straggler; a synchronous step waits for it, the other downpour workers do not.

Reported per repeat and as medians over repeats: final held-out R^2 of each mode, the ratio
downpour / sync, and the wall time each took to first reach the synchronous run's final R^2
(of the same repeat and straggler setting; "never" when downpour does not reach it) and its
ratio. ``--json`` writes one line per run with the whole R^2 curve.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import print_table  # noqa: E402


def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else "mpiexec"


# ---------------------------------------------------------------------------- child (one rank)
def _child(args) -> None:
    import numpy as np
    import torch

    from pybrain_mpi.cli import apply_overrides
    from pybrain_mpi.config import parse_config
    from pybrain_mpi.parallel.parameter_server import ParameterServer
    from pybrain_mpi.trainer import trainer as trainer_module

    example = ROOT / "examples" / "dca_fmri.toml"
    overrides = [f'output.dir="{args.out}"', f"train.epochs={args.epochs}", "train.time_budget_s=0",
                 "train.patience=0", "train.checkpoint_every=0", f"train.seed={args.seed}",
                 f'train.mode="{args.mode}"']
    if args.mode == "downpour":
        overrides += ["train.servers=1", f'train.server_optimizer="{args.server_optimizer}"']
    config = parse_config(apply_overrides(example.read_text(), overrides), str(example))
    snapshots: list[tuple[float, list[torch.Tensor]]] = []
    clock = {"t0": None}

    def record(module, step: int) -> None:
        now = time.perf_counter()
        if clock["t0"] is None:
            clock["t0"] = now
        clock["last"] = (now - clock["t0"], step, module)
        if step % args.eval_every == 0:
            snapshots.append((now - clock["t0"], [p.detach().clone() for p in module.parameters()]))

    trainer = trainer_module.Trainer(config, progress=False, echo=False)
    rank = trainer.rank
    straggler = trainer.size - 1 if args.delay > 0 else -1
    if args.mode == "sync":
        original = trainer._train_step

        def train_step(*a, **k):
            if clock["t0"] is None and rank == 0:
                record(trainer.module, 0)
            result = original(*a, **k)
            if rank == 0:
                record(trainer.module, trainer.step + 1)
            if rank == straggler:
                time.sleep(args.delay)
            return result

        trainer._train_step = train_step
    else:
        original_step, original_begin = ParameterServer.step, ParameterServer.begin_step

        def begin_step(self):
            if self.worker == 0 and clock["t0"] is None:
                record(self.model, 0)  # starts the clock before the first fetch (not snapshotted)
                snapshots.clear()
            original_begin(self)

        def step(self, grads=None):
            original_step(self, grads)
            if self.worker == 0:
                record(self.model, self._local_steps)
            if rank == straggler:
                time.sleep(args.delay)

        ParameterServer.step, ParameterServer.begin_step = step, begin_step
    started = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - started
    if "last" in clock and clock["last"][1] % args.eval_every:  # the model after the last step
        seconds, _, module = clock["last"]
        snapshots.append((seconds, [p.detach().clone() for p in module.parameters()]))
    if snapshots:
        curve = []
        n = trainer.data.size("held_out")
        for seconds, params in snapshots:
            with torch.no_grad():
                for p, value in zip(trainer.module.parameters(), params):
                    p.copy_(value)
            stats, _ = trainer.evaluate_samples("held_out", np.arange(n))
            curve.append((seconds, float(stats.compute(trainer.data.roi_labels)["r2"])))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "curve.json").write_text(json.dumps(curve))
    if rank == 0:
        final = summary["held_out"]["r2"]
        (Path(args.out) / "result.json").write_text(json.dumps({"final_r2": final, "wall_s": wall}))
    import pybrain_mpi as pbm

    pbm.shutdown()


# ---------------------------------------------------------------------------- driver
def _run(args, mode: str, delay: float, out: Path) -> dict:
    command = [_mpiexec(), "-n", str(args.ranks), sys.executable, __file__, "--child", "--mode", mode,
               "--out", str(out), "--epochs", str(args.epochs), "--eval-every", str(args.eval_every),
               "--delay", str(delay), "--seed", str(args.seed), "--server-optimizer", args.server_optimizer]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    result["curve"] = json.loads((out / "curve.json").read_text())
    return result


def _time_to(curve: list, target: float) -> float | None:
    return next((t for t, r2 in curve if r2 >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.02, help="straggler's sleep per step (s); 0: none")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-optimizer", default="adagrad")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default="runs/async_training")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sync", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.quick:
        args.ranks, args.epochs, args.repeats, args.eval_every = 3, 1, 1, 5
    work = Path(args.work)
    rows, records = [], []
    for delay in sorted({0.0, args.delay}):
        for repeat in range(args.repeats):
            # Alternate which mode runs first, so a drift in the machine's load hits both.
            order = ("sync", "downpour") if repeat % 2 == 0 else ("downpour", "sync")
            results = {mode: _run(args, mode, delay, work / f"d{delay}_r{repeat}_{mode}") for mode in order}
            sync, down = results["sync"], results["downpour"]
            target = sync["final_r2"]
            t_sync, t_down = _time_to(sync["curve"], target), _time_to(down["curve"], target)
            row = {"delay_s": delay, "repeat": repeat, "sync_r2": target, "downpour_r2": down["final_r2"],
                   "r2_ratio": down["final_r2"] / target if target else float("nan"),
                   "sync_wall_s": sync["wall_s"], "downpour_wall_s": down["wall_s"],
                   "sync_time_to_r2_s": t_sync, "downpour_time_to_r2_s": t_down,
                   "time_ratio": (t_down / t_sync) if t_down is not None and t_sync else None}
            rows.append(row)
            for mode, result in results.items():
                records.append({"mode": mode, "delay_s": delay, "repeat": repeat, "ranks": args.ranks,
                                "epochs": args.epochs, **result})
            print(json.dumps(row), flush=True)

    def fmt(value):
        return "never" if value is None else value

    print(f"\n{args.ranks} ranks (sync) vs 1 server + {args.ranks - 1} workers (downpour), "
          f"{args.epochs} epochs, examples/dca_fmri.toml data; medians over {args.repeats} repeat(s)")
    table = []
    for delay in sorted({r["delay_s"] for r in rows}):
        mine = [r for r in rows if r["delay_s"] == delay]
        med = lambda key: statistics.median(r[key] for r in mine)  # noqa: E731
        ratios = [r["time_ratio"] for r in mine if r["time_ratio"] is not None]
        table.append({"delay": f"{delay:g} s", "sync R2": med("sync_r2"), "downpour R2": med("downpour_r2"),
                      "R2 ratio": med("r2_ratio"), "sync wall s": med("sync_wall_s"),
                      "downpour wall s": med("downpour_wall_s"),
                      "time-to-R2 ratio": fmt(statistics.median(ratios) if ratios else None),
                      "reached": f"{len(ratios)}/{len(mine)}"})
    print_table(table, [(k, k) for k in table[0]])
    if args.json:
        with open(args.json, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
