"""Worker for tests/test_slurm.py and tests/test_two_node_slurm.py: allreduce under ``srun``
(slurm/allreduce.sbatch, which picks the --mpi plugin) on a local Slurm cluster.

Checks that the MPI world pbm sees is the one Slurm launched (size == SLURM_NTASKS, rank ==
SLURM_PROCID, local rank == SLURM_LOCALID), then sums arrays of several sizes (odd ones included,
so ring chunks are uneven) and compares with a float64 reference that every rank can rebuild,
because each rank's input comes from a seed derived from its rank. Prints one result line per
rank; exits non-zero on any mismatch.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import pybrain_mpi as pbm

SIZES = (1, 7, 1000, 4097, 65537)
DTYPES = (np.float32, np.float64)


def rank_input(rank: int, count: int, dtype: type) -> np.ndarray:
    """The array rank ``rank`` contributes: reproducible on every rank."""
    return np.random.default_rng(1000 * rank + count).standard_normal(count).astype(dtype)


def main() -> int:
    pbm.init()
    rank, size = pbm.rank(), pbm.size()
    slurm = {key: os.environ.get(f"SLURM_{key}") for key in ("NTASKS", "PROCID", "LOCALID", "JOB_ID")}
    failures = []
    if slurm["NTASKS"] is None:
        failures.append("SLURM_NTASKS is not set: not launched by srun, or --export dropped it")
    elif size != int(slurm["NTASKS"]):
        failures.append(f"pbm.size()={size} but SLURM_NTASKS={slurm['NTASKS']}: the ranks did not "
                        "join one MPI world (srun without the --mpi plugin of this MPI?)")
    if slurm["PROCID"] is not None and rank != int(slurm["PROCID"]):
        failures.append(f"pbm.rank()={rank} but SLURM_PROCID={slurm['PROCID']}")
    if slurm["LOCALID"] is not None and pbm.local_rank() != int(slurm["LOCALID"]):
        failures.append(f"pbm.local_rank()={pbm.local_rank()} but SLURM_LOCALID={slurm['LOCALID']}")

    checked = 0
    for dtype in DTYPES:
        eps = np.finfo(dtype).eps
        for count in SIZES:
            inputs = [rank_input(r, count, dtype) for r in range(size)]
            reference = np.sum([x.astype(np.float64) for x in inputs], axis=0)
            result = np.asarray(pbm.allreduce(inputs[rank].copy(), op="sum"))
            # Summing n terms in dtype: each addition rounds once, so the error is bounded by
            # (n - 1) * eps * sum|x_i| per element (plus one rounding of the final value).
            bound = size * eps * np.sum([np.abs(x.astype(np.float64)) for x in inputs], axis=0)
            error = np.abs(result.astype(np.float64) - reference)
            if result.shape != (count,) or result.dtype != dtype:
                failures.append(f"{dtype.__name__}[{count}]: got {result.dtype}{result.shape}")
            elif np.any(error > bound):
                worst = int(np.argmax(error - bound))
                failures.append(f"{dtype.__name__}[{count}]: element {worst} is {result[worst]!r}, "
                                f"reference {reference[worst]!r} (error {error[worst]:.3g} > {bound[worst]:.3g})")
            checked += 1

    pbm.barrier()
    if failures:
        for failure in failures:
            print(f"SLURM_ALLREDUCE_FAIL rank={rank}: {failure}", flush=True)
        return 1
    print(f"SLURM_ALLREDUCE_OK rank={rank} size={size} ntasks={slurm['NTASKS']} "
          f"local_rank={pbm.local_rank()} job={slurm['JOB_ID']} checked={checked} "
          f"env_token={os.environ.get('PBM_SLURM_ENV_TOKEN')} "
          f"path0={os.environ.get('PATH', '').split(os.pathsep)[0]} python={sys.executable}", flush=True)
    pbm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
