"""pybrain-mpi on a real two-node Slurm cluster (slurm/two_node_cluster.sh) on this machine.

The module starts its own cluster (two slurmd in network namespaces with their own hostnames,
a slurmctld on a third, links shaped to 1 Gbit/s, under names and a subnet private to this test
process) and tears it down afterwards, also on failure. It checks that ``srun -N 2
--ntasks-per-node=2`` places ranks 0-1 on node0 and 2-3 on node1, that pybrain-mpi's
local_rank/local_size/cross_size and the engine's node layout follow, that hierarchical
allreduces match a float64 reference with their inter-node bytes on the links, what
``pybrain-mpi info`` reports, that mis-launches are refused in one line while ``mpiexec``
inside a larger allocation is not, and that ``pybrain-mpi train`` from slurm/train.sbatch
checkpoints on SIGUSR1, requeues and resumes across both nodes.

Everything runs with the test venv's MPICH (srun --mpi=pmi2, chosen by the templates). With
``PBM_TEST_OMPI_PYTHON=/path/to/venv/bin/python`` (a venv whose mpi4py and pybrain-mpi are
built against Open MPI: README, "On a cluster") the same tests also run with Open MPI
(srun --mpi=pmix). Needs root, iproute2 and Slurm: lacking them is a FAILURE, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from train_fixtures import step_lines

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "slurm" / "two_node_cluster.sh"
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
ALLREDUCE_SBATCH = ROOT / "slurm" / "allreduce.sbatch"
WORKERS = ROOT / "tests" / "workers"
EXAMPLE = ROOT / "examples" / "dca_fmri.toml"
COUNT = (1 << 20) + 3   # float32 elements of the worker's hierarchical allreduce
STEP_TIMEOUT_S = 120

OMPI_PYTHON = os.environ.get("PBM_TEST_OMPI_PYTHON", "")
FLAVORS = [
    pytest.param("mpich", id="mpich"),
    pytest.param("openmpi", id="openmpi", marks=pytest.mark.skipif(
        not OMPI_PYTHON, reason="Open MPI variant: set PBM_TEST_OMPI_PYTHON to the python of a "
                                "venv built against Open MPI (README, 'On a cluster')")),
]
EXPECTED_PLUGIN = {"mpich": "pmi2", "openmpi": "pmix"}


@dataclass
class TwoNodeCluster:
    env: dict        # talks to this cluster (SLURM_CONF) and runs this script with its names
    conf: Path
    prefix: str

    def run(self, *command: str, timeout_s: float = STEP_TIMEOUT_S, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Runs a command against the cluster, bounded by ``timeout_s`` (a hang fails the test)."""
        try:
            return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s,
                                  env={**self.env, **(env or {})}, cwd=cwd)
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"{' '.join(command)} did not finish in {timeout_s} s\n"
                        f"stdout:\n{expired.stdout}\nstderr:\n{expired.stderr}\n{self.logs()}")

    def link_bytes(self, node: int) -> tuple[int, int]:
        """(sent, received) bytes of a node's link, from the root-namespace end of its veth."""
        stats = Path(f"/sys/class/net/{self.prefix}h{node}/statistics")
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def logs(self) -> str:
        parts = []
        for path in [self.conf.parent / "slurmctld.log", *sorted(self.conf.parent.glob("node*/slurmd.log"))]:
            lines = path.read_text(errors="replace").splitlines()[-12:] if path.exists() else ["(missing)"]
            parts.append(f"--- {path} (last lines)\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodeCluster]:
    if os.geteuid() != 0:
        pytest.fail("the two-node Slurm cluster needs root (network namespaces, Slurm daemons)")
    tag = os.getpid() % 100000
    prefix = f"pbs{tag}"
    env = dict(os.environ, PBM_2N_PREFIX=prefix, PBM_2N_SUBNET=f"10.216.{tag % 250}",
               PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    for name in ("PBM_2N_DIR", "PBM_RANKS_PER_NODE", "PBM_SRUN_MPI", "SLURM_CONF"):
        env.pop(name, None)
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up", "1gbit"], capture_output=True, text=True,
                            env=env, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, timeout=120, capture_output=True)
        pytest.fail(f"{SCRIPT} up did not finish in 300 s")
    try:
        if up.returncode != 0:
            pytest.fail(f"could not bring up the two-node Slurm cluster (these tests are not skipped: "
                        f"CI must have Slurm, iproute2 and root)\nstdout:\n{up.stdout}\nstderr:\n{up.stderr}")
        match = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
        assert match, up.stdout
        env["SLURM_CONF"] = match.group(1)
        yield TwoNodeCluster(env=env, conf=Path(match.group(1)), prefix=prefix)
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, timeout=120, capture_output=True)


def python_of(flavor: str) -> Path:
    return Path(OMPI_PYTHON if flavor == "openmpi" else sys.executable)


def job_env(flavor: str, **extra: str) -> dict:
    """What a job needs at submission: the flavor's venv first on PATH, short timeouts."""
    python = python_of(flavor)
    env = {"PBM_PYTHON": str(python), "PATH": f"{python.parent}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
           "PBM_TIMEOUT_S": "60", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    return env


def srun_plugin(flavor: str) -> str:
    """`pybrain-mpi info --pmi` of the flavor's venv: what the templates pass to srun --mpi."""
    result = subprocess.run([str(python_of(flavor).parent / "pybrain-mpi"), "info", "--pmi"],
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "PBM_SRUN_MPI"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == EXPECTED_PLUGIN[flavor], result.stdout
    return result.stdout.strip()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_srun_places_ranks_by_node_and_hierarchical_allreduce_crosses_the_links(cluster, flavor):
    plugin = srun_plugin(flavor)
    before = [cluster.link_bytes(node) for node in (0, 1)]
    result = cluster.run("srun", "-N", "2", "--ntasks-per-node=2", f"--mpi={plugin}", "--kill-on-bad-exit=1",
                         str(python_of(flavor)), str(WORKERS / "two_node_worker.py"), env=job_env(flavor))
    after = [cluster.link_bytes(node) for node in (0, 1)]
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{cluster.logs()}"
    reports = sorted((json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                      if line.startswith("TWO_NODE ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1, 2, 3], result.stdout
    namespaces = {r["netns"] for r in reports}
    assert len(namespaces) == 2 and os.stat("/proc/self/ns/net").st_ino not in namespaces, reports
    for r in reports:
        node = r["rank"] // 2
        where = f"rank {r['rank']}: {r}"
        # Slurm's block placement: ranks 0-1 on node0, 2-3 on node1, each in its node's namespaces.
        assert r["size"] == 4 and r["hostname"] == r["slurmd_nodename"] == f"node{node}", where
        assert int(r["slurm_procid"]) == r["rank"] and int(r["slurm_localid"]) == r["rank"] % 2, where
        # pybrain-mpi's grouping comes from MPI (ranks sharing memory), not from Slurm variables.
        assert (r["local_rank"], r["local_size"]) == (r["rank"] % 2, 2), where
        assert (r["cross_rank"], r["cross_size"]) == (node, 2), where
        layout = r["node_layout"]
        assert layout["node_count"] == 2 and layout["local_size"] == 2, where
        assert list(layout["node_world_ranks"]) == [2 * node, 2 * node + 1], where
        for name, error in r["errors"].items():
            assert error <= 1.0, f"{where}: {name} allreduce off the float64 reference by {error:.3g} x the bound"
        assert r["netns"] == reports[2 * node]["netns"], where
    # Hierarchical on 2 nodes: each node's link carries the buffer once each way (2(N-1)/N * S).
    hierarchical_bytes = COUNT * 4
    for node in (0, 1):
        sent, received = (after[node][i] - before[node][i] for i in (0, 1))
        assert sent >= hierarchical_bytes and received >= hierarchical_bytes, \
            f"node{node}: {sent} bytes sent, {received} received; the hierarchical allreduce needs {hierarchical_bytes}"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_info_under_srun_names_plugin_pmi_and_both_nodes(cluster, flavor):
    plugin = srun_plugin(flavor)
    result = cluster.run("srun", "-N", "2", "--ntasks-per-node=2", f"--mpi={plugin}",
                         str(python_of(flavor).parent / "pybrain-mpi"), "info", env=job_env(flavor))
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    assert "topology: 4 rank(s) on 2 node(s)" in out and "node0: ranks 0-1" in out and "node1: ranks 2-3" in out, out
    assert re.search(rf"^launcher: srun --mpi={plugin}, 4 process\(es\) .*2 node\(s\) node\[0-1\]", out, re.M), out
    pmi = "PMI-2 (Slurm's mpi/pmi2 plugin)" if plugin == "pmi2" else "(Slurm's mpi/pmix plugin)"
    assert re.search(rf"^PMI: .*{re.escape(pmi)}", out, re.M), out
    assert f"srun --mpi for this build: {plugin}" in out, out


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("how", ["--mpi=none", "MpiDefault"])
def test_srun_without_the_plugin_exits_nonzero_with_one_line(cluster, flavor, how, tmp_path):
    """`srun --mpi=none` (or plain srun on a cluster whose MpiDefault is none): 4 one-rank worlds
    (MPICH) or an abort in MPI_Init (Open MPI) unless pbm.init refuses first."""
    plugin = EXPECTED_PLUGIN[flavor]
    mpi = ["--mpi=none"] if how == "--mpi=none" else []
    program = str(python_of(flavor).parent / "pybrain-mpi")
    for command in (["info"], ["train", str(EXAMPLE), "--set", f"output.dir={tmp_path / 'out'}", "--steps", "1"]):
        started = time.monotonic()
        result = cluster.run("srun", "-N", "2", "--ntasks-per-node=2", *mpi, program, *command,
                             env=job_env(flavor), cwd=tmp_path)
        elapsed = time.monotonic() - started
        text = f"{result.stdout}\n{result.stderr}"
        assert result.returncode != 0, text
        errors = [line for line in result.stderr.splitlines() if line.startswith("pybrain-mpi: error:")]
        assert len(errors) == 1, text
        assert "srun started 4 tasks" in errors[0] and f"srun --mpi={plugin}" in errors[0], errors[0]
        assert "Traceback" not in text and "topology:" not in text, text
        if flavor == "mpich":
            assert "MPI world has 1 rank" in errors[0], errors[0]
        assert elapsed < 60, f"the refusal took {elapsed:.0f} s"
    assert not (tmp_path / "out").exists(), "a refused train run must not write its output directory"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_mpiexec_inside_a_larger_allocation_is_not_refused(cluster, flavor, tmp_path):
    """A batch job of 4 tasks on 2 nodes whose script runs its MPI's own mpiexec for 2 ranks:
    the launcher starts its daemons with srun (a step of 2 tasks, one per node) and
    SLURM_NTASKS says 4; neither is the world, and nothing may be refused."""
    python = python_of(flavor)
    if flavor == "mpich":
        mpiexec = [str(python.parent / "mpiexec")]   # PyPI's mpich: hydra beside the venv's python
    else:   # Open MPI's mpiexec, found beside ompi_info (PATH may also hold MPICH's mpiexec)
        ompi_info = shutil.which("ompi_info")
        assert ompi_info, "Open MPI variant: ompi_info (openmpi-bin) is not on PATH"
        mpiexec = [str(Path(ompi_info).parent / "mpiexec"), "--allow-run-as-root"]
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -e\n"
                      f"{' '.join(mpiexec)} -n 3 {python.parent / 'pybrain-mpi'} info\n"
                      f"{python.parent / 'pybrain-mpi'} info\n")   # and a singleton in the batch step
    output = tmp_path / "job.out"
    result = cluster.run("timeout", str(STEP_TIMEOUT_S), "sbatch", "--wait", "-N", "2", "--ntasks-per-node=2",
                         f"--output={output}", f"--chdir={tmp_path}", str(script), env=job_env(flavor))
    text = output.read_text(errors="replace") if output.exists() else "(no output)"
    assert result.returncode == 0, f"{result.stderr}\n{text}\n{cluster.logs()}"
    assert "pybrain-mpi: error" not in text, text
    assert "topology: 3 rank(s) on 2 node(s)" in text, text
    assert "topology: 1 rank(s) on 1 node(s)" in text, text


@pytest.mark.parametrize("flavor", FLAVORS)
def test_allreduce_template_runs_on_both_nodes(cluster, flavor, tmp_path):
    output = tmp_path / "allreduce.out"
    result = cluster.run("timeout", str(STEP_TIMEOUT_S), "sbatch", "--wait", "-N", "2", "--ntasks-per-node=2",
                         f"--output={output}", f"--chdir={tmp_path}", str(ALLREDUCE_SBATCH),
                         str(WORKERS / "slurm_allreduce.py"), env=job_env(flavor))
    text = output.read_text(errors="replace") if output.exists() else "(no output)"
    assert result.returncode == 0, f"{result.stderr}\n{text}\n{cluster.logs()}"
    assert f"4 tasks on 2 node(s) node[0-1], srun --mpi={EXPECTED_PLUGIN[flavor]}" in text, text
    ok = [line for line in text.splitlines() if line.startswith("SLURM_ALLREDUCE_OK")]
    assert len(ok) == 4 and all("size=4 ntasks=4" in line for line in ok), text


@pytest.mark.parametrize("flavor", FLAVORS)
def test_preempted_training_requeues_and_resumes_across_both_nodes(cluster, flavor, tmp_path):
    """slurm/train.sbatch -N 2 --ntasks-per-node=2 running `pybrain-mpi train` on the DCA example:
    SIGUSR1 to the batch script mid-run, checkpoint, requeue, resume on both nodes, finish."""
    steps = 12
    out_dir, cache = tmp_path / "run", tmp_path / "cache"
    output = tmp_path / "train.out"
    submitted = cluster.run(
        "sbatch", "--parsable", "-N", "2", "--ntasks-per-node=2", "--time=5", f"--output={output}",
        f"--chdir={tmp_path}", str(TRAIN_SBATCH), str(EXAMPLE), "--set", "train.epochs=1",
        "--set", f"output.dir={out_dir}", "--set", "train.log_every=1", "--steps", str(steps), "--no-progress",
        env=job_env(flavor, PBM_TRAIN_STEP_DELAY_S="0.3", PBM_CACHE_DIR=str(cache)))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    def output_text() -> str:
        return output.read_text(errors="replace") if output.exists() else "(no output yet)"

    def job_state() -> str:
        shown = cluster.run("scontrol", "show", "job", "-o", job_id, timeout_s=30)
        match = re.search(r"JobState=(\S+)", shown.stdout)
        return match.group(1) if match else "GONE"   # purged MinJobAge after it ended

    deadline = time.monotonic() + 240
    try:
        while len(step_lines(out_dir, 0)) < 3:
            assert time.monotonic() < deadline, f"job never logged 3 steps\n{output_text()}\n{cluster.logs()}"
            assert job_state() in ("PENDING", "CONFIGURING", "RUNNING"), f"job ended early\n{output_text()}"
            time.sleep(0.2)
        signalled = cluster.run("scancel", "--batch", "--signal=USR1", job_id, timeout_s=30)
        assert signalled.returncode == 0, signalled.stderr
        state = job_state()
        while not ((out_dir / "summary.json").exists() and state in ("COMPLETED", "GONE")):
            assert time.monotonic() < deadline, f"requeued job did not finish (state {state})\n{output_text()}\n{cluster.logs()}"
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), f"state {state}\n{output_text()}"
            time.sleep(0.3)
            state = job_state()
    finally:
        if job_state() not in ("COMPLETED", "GONE"):
            cluster.run("scancel", job_id, timeout_s=30)

    text = output_text()
    plugin = EXPECTED_PLUGIN[flavor]
    for start in (1, 2):
        assert re.search(rf"job {job_id} start {start} \(restart count {start - 1}\): 4 ranks on 2 node\(s\) "
                         rf"node\[0-1\], srun --mpi={plugin}:", text), text
    preempted = re.search(r"stop requested \(SIGTERM/SIGUSR1\): checkpoint at step (\d+)", text)
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert preempted and resumed, f"expected a checkpoint then a resume in the job output:\n{text}"
    assert preempted.group(1) == resumed.group(1) and 3 <= int(preempted.group(1)) < steps, text
    assert f"job {job_id} finished with status 0" in text, text
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == steps, summary
    for rank in range(4):   # every rank of both nodes logged every step exactly once
        assert [r["step"] for r in step_lines(out_dir, rank)] == sorted({r["step"] for r in step_lines(out_dir, rank)}), rank
        assert len(step_lines(out_dir, rank)) == steps, (rank, step_lines(out_dir, rank)[-1:])
