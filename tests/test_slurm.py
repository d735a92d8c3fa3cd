"""pybrain-mpi under a real Slurm: sbatch + srun on the local single-node cluster.

The templates start the ranks with ``srun --mpi=$(pybrain-mpi info --pmi)`` (pmi2 for the test
venv's MPICH); tests/test_two_node_slurm.py runs them across two nodes.

The module fixture brings the cluster up with slurm/local_cluster.sh (installing Debian's Slurm
when it is missing and apt is usable) and stops it afterwards only if it was not running before.
No Slurm and no way to install it is a FAILURE, not a skip: CI must provide it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from train_fixtures import step_lines, write_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "slurm" / "local_cluster.sh"
ALLREDUCE_SBATCH = ROOT / "slurm" / "allreduce.sbatch"
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
WORKERS = ROOT / "tests" / "workers"
JOB_TIMEOUT_S = 90


@dataclass
class Cluster:
    """A running local Slurm: the environment that talks to it and where its logs are."""

    env: dict
    conf: Path

    def run(self, *command: str, timeout_s: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
        """Runs a Slurm client command against this cluster, bounded by ``timeout_s``."""
        return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s,
                              env={**self.env, **(env or {})})

    def logs(self) -> str:
        """Tails of the daemon logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.conf.parent / name
            lines = path.read_text(errors="replace").splitlines()[-15:] if path.exists() else ["(missing)"]
            parts.append(f"--- {path} (last lines)\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Starts the local cluster (idempotent) and stops it afterwards if this fixture started it."""
    was_running = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True,
                                 text=True, timeout=30).returncode == 0
    try:
        started = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True,
                                 timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{CLUSTER_SCRIPT} start did not finish in 300 s (installing or starting Slurm hung)")
    if started.returncode != 0:
        pytest.fail(
            "could not bring up the local Slurm cluster, which these tests need (they are not "
            "skipped: CI must have Slurm). Install it with\n"
            "    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge\n"
            f"then run {CLUSTER_SCRIPT} start.\n"
            f"stdout:\n{started.stdout}\nstderr:\n{started.stderr}"
        )
    match = re.search(r"export SLURM_CONF=(\S+)", started.stdout)
    assert match, f"local_cluster.sh start printed no SLURM_CONF line:\n{started.stdout}"
    conf = Path(match.group(1))
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    yield Cluster(env=env, conf=conf)
    if not was_running:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, text=True, timeout=60)


def job_env(**extra: str) -> dict:
    """What a test job needs at submission: this venv's python, one thread per rank, short timeouts."""
    return {"PBM_PYTHON": sys.executable, "PBM_TIMEOUT_S": "60", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def batch_jobs(cluster: Cluster, tmp_path_factory) -> dict:
    """Submits the allreduce jobs (2 and 3 ranks) and one with a missing script, all at once.

    They run side by side (the node declares 8 CPUs) under ``sbatch --wait``, each bounded by
    ``timeout``, so the module pays for the slowest job instead of their sum.
    """
    out_dir = tmp_path_factory.mktemp("slurm_jobs")
    token = uuid.uuid4().hex
    jobs = {
        2: [str(WORKERS / "slurm_allreduce.py")],
        3: [str(WORKERS / "slurm_allreduce.py")],
        "missing_script": [str(out_dir / "no_such_script.py")],
    }
    launched = {}
    for key, script_args in jobs.items():
        ranks = key if isinstance(key, int) else 2
        output = out_dir / f"job_{key}.out"
        # The templates' geometry is -N NODES --ntasks-per-node=RANKS (defaults: 1 node, 2 ranks).
        command = ["timeout", str(JOB_TIMEOUT_S), "sbatch", "--wait", "--parsable", f"--ntasks-per-node={ranks}",
                   f"--output={output}", f"--chdir={out_dir}", "--time=5", str(ALLREDUCE_SBATCH), *script_args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**cluster.env, **job_env(PBM_SLURM_ENV_TOKEN=token)})
        launched[key] = (process, output, time.monotonic())
    results = {}
    for key, (process, output, started) in launched.items():
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S + 30)
        job_id = stdout.strip().split(";")[0]
        if process.returncode == 124 and job_id:
            cluster.run("scancel", job_id)
        text = output.read_text(errors="replace") if output.exists() else "(no output file)"
        results[key] = {"returncode": process.returncode, "stdout": stdout, "stderr": stderr,
                        "output": text, "seconds": time.monotonic() - started, "token": token}
    return results


def describe(job: dict, cluster: Cluster) -> str:
    """Everything about a job worth seeing when its test fails."""
    return (f"sbatch exit {job['returncode']} after {job['seconds']:.1f} s\nsbatch stdout: {job['stdout']}\n"
            f"sbatch stderr: {job['stderr']}\njob output:\n{job['output']}\n{cluster.logs()}")


@pytest.mark.parametrize("ranks", [2, 3])
def test_sbatch_srun_allreduce_matches_numpy_reference(ranks: int, batch_jobs: dict, cluster: Cluster):
    job = batch_jobs[ranks]
    assert job["returncode"] == 0, f"the {ranks}-rank allreduce job failed\n{describe(job, cluster)}"
    assert "SLURM_ALLREDUCE_FAIL" not in job["output"], describe(job, cluster)
    lines = [line for line in job["output"].splitlines() if line.startswith("SLURM_ALLREDUCE_OK")]
    fields = [dict(item.split("=", 1) for item in line.split()[1:]) for line in lines]
    assert sorted(int(f["rank"]) for f in fields) == list(range(ranks)), describe(job, cluster)
    for f in fields:
        # One MPI world of exactly the tasks Slurm launched, each having checked every case.
        assert int(f["size"]) == ranks and int(f["ntasks"]) == ranks, describe(job, cluster)
        assert int(f["checked"]) == 10, describe(job, cluster)


def test_sbatch_environment_reaches_every_srun_task(batch_jobs: dict, cluster: Cluster):
    job = batch_jobs[3]
    assert job["returncode"] == 0, describe(job, cluster)
    fields = [dict(item.split("=", 1) for item in line.split()[1:])
              for line in job["output"].splitlines() if line.startswith("SLURM_ALLREDUCE_OK")]
    assert len(fields) == 3, describe(job, cluster)
    for f in fields:
        # A variable set only at submission arrives in each rank (--export=ALL), the job runs the
        # submitting venv's python, and that venv's bin/ leads PATH (its mpich, its console scripts).
        assert f["env_token"] == job["token"], describe(job, cluster)
        # resolved: pytest may have been started through a relative path to the venv
        assert Path(f["python"]).resolve() == Path(sys.executable).resolve(), describe(job, cluster)
        assert Path(f["path0"]).resolve() == Path(sys.executable).parent.resolve(), describe(job, cluster)


def test_sbatch_job_with_missing_script_fails_with_nonzero_exit(batch_jobs: dict, cluster: Cluster):
    job = batch_jobs["missing_script"]
    assert job["returncode"] not in (0, 124), f"expected a prompt failure\n{describe(job, cluster)}"
    assert "no_such_script.py" in job["output"], describe(job, cluster)


def test_srun_with_missing_program_fails_fast(cluster: Cluster):
    started = time.monotonic()
    result = cluster.run("srun", "--ntasks=2", "--mpi=pmi2", "/nonexistent/pbm-no-such-program", timeout_s=30)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout + result.stderr
    assert "pbm-no-such-program" in result.stderr, result.stderr
    assert elapsed < 10, f"srun took {elapsed:.1f} s to report a missing program"


def test_job_asking_more_tasks_than_cpus_is_rejected_at_submission(cluster: Cluster, tmp_path: Path):
    # EnforcePartLimits=ALL: an impossible request must fail now, not pend forever.
    started = time.monotonic()
    result = cluster.run("sbatch", "--ntasks-per-node=64", f"--chdir={tmp_path}", str(ALLREDUCE_SBATCH),
                         str(WORKERS / "slurm_allreduce.py"), timeout_s=30, env=job_env())
    elapsed = time.monotonic() - started
    assert result.returncode != 0, f"sbatch accepted 64 tasks on an 8-CPU node:\n{result.stdout}"
    assert "processors" in result.stderr.lower() or "cpu" in result.stderr.lower(), result.stderr
    assert elapsed < 10, f"rejection took {elapsed:.1f} s"


def wait_for_requeued_job(cluster, job_state, result: Path, deadline: float, output_text,
                          poll_s: float) -> None:
    """Waits until the (requeued) job has written `result` and left the queue; fails on a
    failed state or at `deadline`, showing the job's output and the daemons' logs."""
    state = job_state()
    while not (result.exists() and state in ("COMPLETED", "GONE")):
        assert time.monotonic() < deadline, (f"requeued job did not finish (state {state})\n"
                                             f"{output_text()}\n{cluster.logs()}")
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), f"state {state}\n{output_text()}"
        time.sleep(poll_s)
        state = job_state()


def _job_probes(cluster: Cluster, output: Path, job_id: str):
    """(output_text, job_state) of a submitted job: its output so far and its Slurm state
    ("GONE" once finished jobs are purged after MinJobAge)."""

    def output_text() -> str:
        return output.read_text(errors="replace") if output.exists() else "(no output yet)"

    def job_state() -> str:
        shown = cluster.run("scontrol", "show", "job", "-o", job_id)
        match = re.search(r"JobState=(\S+)", shown.stdout)
        return match.group(1) if match else "GONE"

    return output_text, job_state


def test_preempted_train_job_checkpoints_requeues_and_resumes(cluster: Cluster, tmp_path: Path):
    """USR1 to the batch script (what --signal=B:USR1@120 sends) ends in a requeued, resumed job.

    slurm/train.sbatch runs tests/workers/slurm_preemptible.py in place of ``pybrain-mpi train``;
    the job is signalled once it is past step 3, must checkpoint, requeue itself, start again
    with the same id and finish every step exactly once.
    """
    output = tmp_path / "train.out"
    command = f"{sys.executable} {WORKERS / 'slurm_preemptible.py'}"
    submitted = cluster.run("sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                            "--time=5", f"--output={output}", f"--chdir={tmp_path}", str(TRAIN_SBATCH),
                            str(tmp_path), env=job_env(PBM_COMMAND=command))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    output_text, job_state = _job_probes(cluster, output, job_id)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not (tmp_path / "running.0").exists():
            assert time.monotonic() < deadline, f"job never got past step 3\n{output_text()}\n{cluster.logs()}"
            assert job_state() in ("PENDING", "CONFIGURING", "RUNNING"), f"job ended early\n{output_text()}"
            time.sleep(0.1)
        signalled = cluster.run("scancel", "--batch", "--signal=USR1", job_id)
        assert signalled.returncode == 0, signalled.stderr

        wait_for_requeued_job(cluster, job_state, tmp_path / "result.json", deadline, output_text, 0.2)
    finally:
        if job_state() not in ("COMPLETED", "GONE"):
            cluster.run("scancel", job_id)

    text = output_text()
    preempted = re.search(r"PBM_WORKER preempted: checkpoint at step (\d+)", text)
    resumed = re.search(r"PBM_WORKER resumed at step (\d+) \(restart 1\)", text)
    assert preempted and resumed, f"expected a checkpoint then a resume in the job output:\n{text}"
    assert preempted.group(1) == resumed.group(1), text
    assert "requeueing job" in text and f"job {job_id} start 2 (restart count 1)" in text, text
    assert re.search(r"finished 24 steps: total (\S+) expected \1 OK", text), text
    assert "job %s finished with status 0" % job_id in text, text




def _train_steps(output: Path) -> list[tuple]:
    """(step, global loss, rank-0 loss) of every logged step of rank 0."""
    return [(r["step"], r["loss"], r["local_loss"]) for r in step_lines(output, 0)]


def test_preempted_real_training_job_resumes_and_ends_like_an_uninterrupted_run(cluster: Cluster,
                                                                              tmp_path: Path):
    """`pybrain-mpi train` itself under sbatch/srun: USR1 mid-run, checkpoint, requeue, resume.

    The requeued job must finish with the same held-out metrics and loss curve (float64) as the
    same config run without interruption under mpiexec.
    """
    from conftest import run_mpi

    steps = 10
    cache = tmp_path / "cache"
    job_out, reference_out = tmp_path / "job", tmp_path / "reference"
    job_cfg = tmp_path / "job.toml"
    write_config(job_cfg, job_out, cache)
    reference_cfg = tmp_path / "reference.toml"
    write_config(reference_cfg, reference_out, cache)
    output = tmp_path / "train.out"
    # The delay keeps the short job running long enough to be signalled mid-run.
    submitted = cluster.run("sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                            "--time=5", f"--output={output}", f"--chdir={tmp_path}", str(TRAIN_SBATCH),
                            str(job_cfg), "--steps", str(steps), "--no-progress",
                            env=job_env(PBM_TRAIN_STEP_DELAY_S="0.4", PBM_CACHE_DIR=str(cache)))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    output_text, job_state = _job_probes(cluster, output, job_id)

    deadline = time.monotonic() + 150
    try:
        while len(_train_steps(job_out)) < 3:
            assert time.monotonic() < deadline, f"job never logged 3 steps\n{output_text()}\n{cluster.logs()}"
            assert job_state() in ("PENDING", "CONFIGURING", "RUNNING"), f"job ended early\n{output_text()}"
            time.sleep(0.2)
        signalled = cluster.run("scancel", "--batch", "--signal=USR1", job_id)
        assert signalled.returncode == 0, signalled.stderr
        # The uninterrupted reference runs while the job checkpoints, waits and resumes.
        run_mpi(2, "train_cli.py", "train", str(reference_cfg), "--steps", str(steps),
                "--no-progress", timeout_s=150)
        wait_for_requeued_job(cluster, job_state, job_out / "summary.json", deadline, output_text, 0.3)
    finally:
        if job_state() not in ("COMPLETED", "GONE"):
            cluster.run("scancel", job_id)

    text = output_text()
    preempted = re.search(r"stop requested \(SIGTERM/SIGUSR1\): checkpoint at step (\d+)", text)
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert preempted and resumed, f"expected a checkpoint then a resume in the job output:\n{text}"
    assert preempted.group(1) == resumed.group(1) and int(preempted.group(1)) < steps, text
    assert f"job {job_id} start 2 (restart count 1)" in text, text
    job_summary = json.loads((job_out / "summary.json").read_text())
    reference_summary = json.loads((reference_out / "summary.json").read_text())
    assert job_summary["steps"] == reference_summary["steps"] == steps
    assert job_summary["held_out"] == reference_summary["held_out"], (job_summary, reference_summary)
    assert job_summary["final_train_loss"] == reference_summary["final_train_loss"]
    assert _train_steps(job_out) == _train_steps(reference_out)
