"""Every shell block of README.md and slurm/README.md runs as shown, or says why it cannot here.

Each fenced block marked ``bash``/``sh``/``shell`` is one test: it runs with ``bash -e -o
pipefail`` in a fresh copy of the checkout (tracked files, with ``.venv`` linked to this
environment's, so ``.venv/bin/...`` and ``$PWD/.venv/bin/python`` are the venv under test),
with that venv's ``bin`` first on PATH (as after ``. .venv/bin/activate``), bounded in time,
and passes when it exits 0. The Slurm blocks start the cluster they use (local_cluster.sh,
two_node_cluster.sh) and the emulated-cluster blocks theirs, under a state dir, ports, names
and subnets private to this test process; whatever a block brought up is torn down after it,
also when it fails. ``sudo`` runs the command itself when this runs as root without sudo.

A block is not run only for a reason listed in NOT_RUN (and a prefix only per
COVERED_ELSEWHERE); a listed reason that no longer matches any block fails, so the list stays
true. A new block runs by default.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "slurm" / "README.md")
SHELL_LANGUAGES = {"bash", "sh", "shell"}
FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
DEFAULT_TIMEOUT_S = 300

# (pattern searched in the block, why it does not run here)
NOT_RUN = [
    (r"^\.venv/bin/pytest -q\s*$",
     "the test suite itself, which this test is part of (CI runs it: the last line of .ci/run, "
     "checked by test_ci_runs_the_readme_setup_and_test_commands)"),
    (r"^module load ",
     "needs environment modules (`module load`) and builds a second environment against the "
     "system MPI (about 10 minutes); .ci/run does the same with Debian's Open MPI (PBM_VENV=.venv-ompi "
     "PBM_SYSTEM_MPI=1 ./setup.sh) for tests/test_two_node_slurm.py"),
    (r"--gpus-per-task", "asks for GPU nodes, which this machine does not have"),
    (r"cluster_allreduce\.py\s+# 2x2",
     "the whole benchmark (2 rates x 2 placements x 3 sizes x 7 implementations, tens of "
     "minutes); the short variant above runs the same program"),
]
# (pattern of a block's leading command, why only the rest of the block runs here)
COVERED_ELSEWHERE = [
    (r"^\./setup\.sh && ",
     "CI runs ./setup.sh right before the suite (.ci/run, checked); running it again would "
     "reinstall the package under test while the suite runs"),
]
# Longer bounds for blocks that train the README example as shown.
TIMEOUTS_S = {r"pybrain-mpi train examples/dca_fmri\.toml\s*$": 600,
              r"sbatch --wait -N 2 --ntasks-per-node=4 slurm/allreduce\.sbatch": 150}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    text: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def shell_blocks() -> list[Block]:
    blocks = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1).lower() in SHELL_LANGUAGES:
                line = text.count("\n", 0, match.start()) + 1
                blocks.append(Block(doc, line, match.group(2)))
    return blocks


BLOCKS = shell_blocks()


def not_run_reason(block: Block) -> str | None:
    for pattern, reason in NOT_RUN:
        if re.search(pattern, block.text, re.M):
            return reason
    return None


def runnable_text(block: Block) -> str:
    text = block.text
    for pattern, _reason in COVERED_ELSEWHERE:
        text = re.sub(pattern, "", text, count=1, flags=re.M)
    return text


def test_the_documents_have_shell_blocks_and_every_exception_matches_one():
    assert len(BLOCKS) >= 8, [b.name for b in BLOCKS]
    for pattern, reason in NOT_RUN + COVERED_ELSEWHERE:
        assert any(re.search(pattern, b.text, re.M) for b in BLOCKS), \
            f"no README block matches {pattern!r} any more ({reason}): drop it from the list"


def test_ci_runs_the_readme_setup_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert "./setup.sh" in commands, ".ci/run no longer runs ./setup.sh, which the README's first block assumes"
    suite = next(pattern for pattern, _ in NOT_RUN if "pytest" in pattern)
    test_blocks = [b for b in BLOCKS if re.search(suite, b.text, re.M)]
    assert test_blocks and commands[-1] == test_blocks[0].text.strip(), (commands[-1], test_blocks)


# ------------------------------------------------------------------ running one block
def make_t1_nifti(directory: Path) -> None:
    """The T1 volume README's convert example reads (a small synthetic one)."""
    import nibabel
    import numpy as np

    volume = np.random.default_rng(0).random((40, 48, 36), dtype=np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), str(directory / "t1.nii.gz"))


INPUTS = {r"convert t1\.nii\.gz": make_t1_nifti}
# What a block brings up and the command that takes it down again (run after the block).
TEARDOWN = {
    "local_cluster.sh": ["slurm/local_cluster.sh", "stop"],
    "two_node_cluster.sh": ["slurm/two_node_cluster.sh", "down"],
    "emulated_cluster.sh": ["slurm/emulated_cluster.sh", "down"],
}
# What a block must also have produced, beyond exiting 0.
EXPECT = {
    # README: "prints held-out reconstruction R^2, samples/s and bytes communicated"; outputs
    # land in runs/dca_fmri/.
    r"pybrain-mpi train examples/dca_fmri\.toml\s*$": lambda cwd, out: (cwd / "runs" / "dca_fmri" / "summary.json").exists()
    and all(word in out for word in ("held-out R^2", "samples/s", "bytes communicated")),
    r"sbatch --wait .*train\.sbatch": lambda cwd, out: "finished with status 0" in out,
    r"two_node_cluster\.sh up.*\n.*hostname": lambda cwd, out: sorted(re.findall(r"^node[01]$", out, re.M))
    == ["node0", "node0", "node1", "node1"] and "topology: 4 rank(s) on 2 node(s)" in out,
    r"grep -c SLURM_ALLREDUCE_OK .*# 8": lambda cwd, out: re.search(r"^8$", out, re.M) is not None,
    r"--mpi=none": lambda cwd, out: "pybrain-mpi: error: srun started 2 tasks" in out and "exit status 2" in out,
}


@pytest.fixture(scope="module")
def block_env(tmp_path_factory) -> dict:
    """The environment blocks run in: this venv first on PATH, private cluster names and ports."""
    tag = os.getpid() % 100000
    bin_dir = Path(sys.executable).parent
    shims = tmp_path_factory.mktemp("shims")
    path = f"{bin_dir}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    if shutil.which("sudo") is None and os.geteuid() == 0:
        (shims / "sudo").write_text('#!/bin/sh\n# root without sudo: run the command itself\nexec env "$@"\n')
        (shims / "sudo").chmod(0o755)
        path = f"{path}:{shims}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBM_"))}
    env.update({
        "PATH": path, "PYTHONUNBUFFERED": "1",
        "PBM_CACHE_DIR": str(tmp_path_factory.mktemp("pbm_cache")),
        "PBM_SLURM_DIR": str(tmp_path_factory.mktemp("local_slurm")),
        "PBM_SLURM_CTLD_PORT": str(17000 + 2 * (tag % 1000)),
        "PBM_SLURM_SLURMD_PORT": str(17001 + 2 * (tag % 1000)),
        "PBM_2N_PREFIX": f"pbr{tag}", "PBM_2N_SUBNET": f"10.218.{tag % 250}",
        "PBM_EMU_PREFIX": f"pbe{tag}", "PBM_EMU_SUBNET": f"10.219.{tag % 250}",
    })
    return env


def checkout_copy(destination: Path) -> Path:
    """The tracked files of this checkout, with .venv linked to the venv under test."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            if name and (ROOT / name).is_file():
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, destination / name)
    else:  # not a git checkout (an unpacked archive): everything but local state
        shutil.copytree(ROOT, destination, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns(".venv*", "build", "runs", "results", ".git", "__pycache__"))
    (destination / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return destination


def _run_block(script: str, cwd: Path, block_env: dict, timeout_s: float):
    """Runs a block's script in ``cwd``; returns (process, output, timed out). Clusters the
    block starts are torn down in any case."""
    process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=block_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        timed_out = True
    finally:
        for marker, command in TEARDOWN.items():
            if marker in script:
                subprocess.run(command, cwd=cwd, env=block_env, capture_output=True, timeout=120)
    return process, output, timed_out


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_shell_block_runs(block: Block, block_env: dict, tmp_path: Path):
    reason = not_run_reason(block)
    if reason:
        pytest.skip(reason)
    timeout_s = next((t for p, t in TIMEOUTS_S.items() if re.search(p, block.text, re.M)), DEFAULT_TIMEOUT_S)
    script = runnable_text(block)
    cwd = checkout_copy(tmp_path / "checkout")
    for pattern, make in INPUTS.items():
        if re.search(pattern, block.text):
            make(cwd)
    process, output, timed_out = _run_block(script, cwd, block_env, timeout_s)
    if timed_out:
        pytest.fail(f"{block.name} did not finish in {timeout_s} s:\n{script}\n--- output:\n{output[-6000:]}")
    assert process.returncode == 0, f"{block.name} exited with {process.returncode}:\n{script}\n--- output:\n{output[-6000:]}"
    for pattern, check in EXPECT.items():
        if re.search(pattern, script, re.M):
            assert check(cwd, output), f"{block.name} ran but not as documented ({pattern}):\n{output[-6000:]}"
