"""Horovod's PyTorch example scripts run against ``pybrain_mpi.horovod`` with only the import
line changed.

``examples/pytorch/pytorch_synthetic_benchmark.py`` and ``examples/pytorch/pytorch_mnist.py`` are
read from a Horovod checkout at run time (``PBM_HOROVOD_SRC``, as in
``tests/test_horovod_upstream.py``, whose helpers this file uses; nothing of Horovod is stored
in this repository). The one change: ``import horovod.torch as hvd`` becomes ``import
pybrain_mpi.horovod as hvd`` (pytorch_mnist.py also has a bare ``import horovod``, used only by
its ``--num-proc`` path, Horovod's own launcher ``horovod.run``; it becomes ``import
pybrain_mpi.horovod as horovod``). The scripts then run under ``mpiexec -n 2`` WITHOUT the
test shim on ``PYTHONPATH``, as a user would run them.

Both scripts import torchvision. The interpreter is ``PBM_TEST_TORCHVISION_PYTHON`` (a Python
with torchvision and pybrain-mpi installed; default: the one running the tests); where it
cannot import torchvision the tests are skipped, naming the import error.

MNIST "with local data": nothing can be downloaded here and no package ships MNIST, so the
test writes a small SYNTHETIC data set in MNIST's IDX format to ``DATA/MNIST/raw`` under the
names torchvision looks for (uncompressed: ``MNIST._check_exists`` only checks that
``raw/train-images-idx3-ubyte`` etc. exist, so ``download=True`` does not go to the network).
Each image is a noisy horizontal bar whose row is its label, so one epoch can learn it and the
test accuracy must beat chance (10 %).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_horovod_upstream import horovod_file, run_ranks

RANKS = 2
HOROVOD_IMPORTS = {
    "import horovod.torch as hvd": "import pybrain_mpi.horovod as hvd",
    "import horovod": "import pybrain_mpi.horovod as horovod",
}
# Lines of each script that import Horovod (and so are rewritten); no other line may change.
EXPECTED_CHANGES = {
    "pytorch_synthetic_benchmark.py": ["import horovod.torch as hvd"],
    "pytorch_mnist.py": ["import horovod", "import horovod.torch as hvd"],
}


def torchvision_python() -> str:
    """The interpreter for the examples: PBM_TEST_TORCHVISION_PYTHON, else this one."""
    return os.environ.get("PBM_TEST_TORCHVISION_PYTHON") or sys.executable


def skip_without_torchvision(python: str, example: str) -> None:
    """Skips, naming the import error, where ``python`` cannot import what the examples import."""
    probe = subprocess.run([python, "-c", "import torchvision.models, torchvision.datasets"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        error = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        pytest.skip(f"Horovod's {example} imports torchvision, which {python} cannot import: {error} "
                    "(set PBM_TEST_TORCHVISION_PYTHON to a Python with torchvision and pybrain-mpi)")


def with_pybrain_import(script: Path) -> list[str]:
    """Rewrites ``script`` in place, its Horovod import lines only; returns the lines changed."""
    lines = script.read_text().splitlines(keepends=True)
    changed = []
    for i, line in enumerate(lines):
        replacement = HOROVOD_IMPORTS.get(line.strip())
        if replacement is not None:
            changed.append(line.strip())
            lines[i] = line.replace(line.strip(), replacement)
    script.write_text("".join(lines))
    return changed


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Writes ``array`` (uint8) in MNIST's IDX format."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def synthetic_mnist(root: Path, train: int = 2048, test: int = 512) -> None:
    """A SYNTHETIC MNIST-shaped data set in ``root/MNIST/raw``: 28x28 uint8 noise with a bright
    bar in rows 2+2*label .. 3+2*label, so the label is learnable from the image."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 80, (count, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label:4 + 2 * label, 4:24] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def run_example(example: str, args: list[str], tmp_path: Path) -> str:
    """Takes ``example`` from the Horovod checkout, changes its import line(s) only, runs it on
    RANKS ranks with the torchvision Python and no shim; returns its output (exit 0 asserted)."""
    script = horovod_file(f"examples/pytorch/{example}", tmp_path)
    python = torchvision_python()
    skip_without_torchvision(python, example)
    original = script.read_text().splitlines()
    assert with_pybrain_import(script) == EXPECTED_CHANGES[example]
    rewritten = script.read_text().splitlines()
    assert len(rewritten) == len(original)
    differing = [(a, b) for a, b in zip(original, rewritten) if a != b]
    assert [a for a, _ in differing] == EXPECTED_CHANGES[example], differing
    result = run_ranks([str(script), *args], tmp_path, timeout_s=900, python=python, shim=False,
                       env={"HOME": str(tmp_path), "PBM_TIMEOUT_S": "120"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{example} failed on {RANKS} ranks\n{output[-10000:]}"
    return result.stdout


def test_synthetic_benchmark_runs_with_only_the_import_changed(tmp_path: Path):
    """pytorch_synthetic_benchmark.py trains resnet18 on 2 ranks; rank 0 reports every
    iteration's img/sec and the total, which is RANKS times their mean."""
    iters = 3
    out = run_example("pytorch_synthetic_benchmark.py",
                      ["--no-cuda", "--model", "resnet18", "--batch-size", "4", "--num-warmup-batches", "1",
                       "--num-batches-per-iter", "2", "--num-iters", str(iters)], tmp_path)
    assert f"Number of CPUs: {RANKS}" in out, out
    per_iter = [float(v) for v in re.findall(r"Iter #\d+: ([\d.]+) img/sec per CPU", out)]
    assert len(per_iter) == iters and all(v > 0 for v in per_iter), out
    total = re.search(r"Total img/sec on (\d+) CPU\(s\): ([\d.]+) \+-([\d.]+)", out)
    assert total is not None, out
    assert int(total.group(1)) == RANKS
    assert float(total.group(2)) == pytest.approx(RANKS * float(np.mean(per_iter)), abs=0.1 * RANKS + 1e-9)
    print(f"img/sec per CPU: {per_iter}; total on {RANKS} CPUs: {total.group(2)} +-{total.group(3)}")


def test_mnist_runs_with_only_the_import_changed(tmp_path: Path):
    """pytorch_mnist.py trains one epoch on a local synthetic MNIST on 2 ranks: every rank logs
    finite training losses over its half of the data, and the averaged test accuracy beats
    chance (10 %) and the test loss beats that of a uniform guess (ln 10)."""
    synthetic_mnist(tmp_path / "data")
    out = run_example("pytorch_mnist.py",
                      ["--no-cuda", "--epochs", "1", "--batch-size", "32", "--test-batch-size", "128",
                       "--lr", "0.05", "--log-interval", "8", "--data-dir", str(tmp_path / "data")], tmp_path)
    train = re.findall(r"Train Epoch: 1 \[(\d+)/(\d+) \(\d+%\)\]\tLoss: (\S+)", out)
    per_rank = 2048 // RANKS
    # 32 batches of 32 per rank, logged every 8th: 4 lines per rank, 8 in all.
    assert len(train) == RANKS * 4, out
    assert all(int(total) == per_rank for _, total, _ in train), train
    losses = [float(loss) for _, _, loss in train]
    assert all(math.isfinite(v) for v in losses), losses
    # Training did something: each rank's loss at its last logged batch (sample 768) is below
    # the ranks' loss at their first (sample 0, about ln 10 for the untrained net).
    first = [float(v) for seen, _, v in train if int(seen) == 0]
    last = [float(v) for seen, _, v in train if int(seen) == 24 * 32]
    assert len(first) == len(last) == RANKS and max(last) < min(first), train
    test = re.search(r"Test set: Average loss: ([^,\s]+), Accuracy: ([\d.]+)%", out)
    assert test is not None, out
    loss, accuracy = float(test.group(1)), float(test.group(2))
    print(f"train losses {losses}; test loss {loss}, accuracy {accuracy}%")
    assert math.isfinite(loss) and loss < math.log(10), out
    assert accuracy > 30.0, out
