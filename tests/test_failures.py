"""No cross-rank wait outlives PBM_TIMEOUT_S, with real ranks really stopped (SIGSTOP) or
killed (SIGKILL): the bounded object collectives, the model check, the exit after a failed
collective, a dead peer on the 2-rank ring, a rank stopped while rank 0 writes a checkpoint,
and MPICH's SIGUSR1 about a dead rank (not a preemption request)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WORKERS, mpiexec_path
from train_fixtures import launch as launch_training
from train_fixtures import step_lines, write_config

TIMEOUT_S = 4  # PBM_TIMEOUT_S of these runs, and their PBM_EXIT_TIMEOUT_S


def _pids(pid_dir: Path) -> list[int]:
    pids = []
    for path in pid_dir.glob("*.pid"):
        try:
            pids.append(int(path.read_text()))
        except ValueError:
            pass
    return pids


def _end(pids: list[int]) -> None:
    """Ends the rank processes this test started (stopped ones too)."""
    for pid in pids:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def launch(ranks: int, args: list[str], pid_dir: Path, *, limit_s: float, env: dict | None = None,
           mpiexec_args: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """Runs ``python ARGS`` on ``ranks`` ranks; fails the test if the launch is still alive
    after ``limit_s`` (then ends every rank it started, stopped ones included)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                    PBM_TIMEOUT_S=str(TIMEOUT_S), PBM_EXIT_TIMEOUT_S=str(TIMEOUT_S), **(env or {}))
    command = [mpiexec_path(), *mpiexec_args, "-n", str(ranks), sys.executable, *args]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=full_env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _end(_pids(pid_dir))
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(args[:3])} on {ranks} ranks still running after {limit_s} s "
                    f"(PBM_TIMEOUT_S={TIMEOUT_S})\nstdout:\n{stdout}\nstderr:\n{stderr}")
    finally:
        _end(_pids(pid_dir))
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), \
        time.monotonic() - started


def caught(stdout: str) -> list[dict]:
    found = []
    for match in re.finditer(r"^CAUGHT (\w+) ranks=\[([\d, ]*)\] rank=(\d+): (.*)$", stdout, re.M):
        found.append({"type": match[1], "ranks": [int(r) for r in match[2].split(",") if r.strip()],
                      "rank": int(match[3]), "message": match[4]})
    return found


def assert_timeouts_name(result: subprocess.CompletedProcess, missing: int, fragments: list[str]) -> None:
    """Every rank but the last (``missing``) reported a CollectiveTimeout naming only it, whose
    message holds each of ``fragments``, after about PBM_TIMEOUT_S (its ELAPSED lines)."""
    out = result.stdout + result.stderr
    reports = caught(result.stdout)
    assert sorted(r["rank"] for r in reports) == list(range(missing)), out
    for report in reports:
        assert report["type"] == "CollectiveTimeout", out
        assert report["ranks"] == [missing], out
        assert all(fragment in report["message"] for fragment in fragments), out
    for seconds in re.findall(r"^ELAPSED ([\d.]+)", result.stdout, re.M):
        assert TIMEOUT_S * 0.9 <= float(seconds) <= 3 * TIMEOUT_S + 10, out


# --------------------------------------------------------------- a stopped peer, each wait
@pytest.mark.parametrize("mode,ranks,what", [
    ("gather", 2, "RNG states"),
    ("gather", 3, "RNG states"),
    ("allgather", 3, "host names"),
    ("broadcast", 2, "the config"),
    ("barrier", 4, "before the epoch"),
    ("consistency", 2, "parameter check (digest)"),
    ("allreduce", 3, "grad"),
])
def test_a_stopped_rank_is_named_and_the_others_exit_while_it_stays_stopped(tmp_path, mode, ranks,
                                                                            what):
    # Each waiting rank: a timeout after PBM_TIMEOUT_S, then at most PBM_TIMEOUT_S more to exit.
    result, elapsed = launch(ranks, [str(WORKERS / "failure_worker.py"), mode, str(tmp_path)],
                             tmp_path, limit_s=4 * TIMEOUT_S + 40)
    out = result.stdout + result.stderr
    stopped = ranks - 1
    assert_timeouts_name(result, stopped, [str(stopped), what])
    assert "RESUMED" not in out  # nobody waited for the stopped rank to continue
    # MPI_Finalize would have waited for it: each waiting rank said so and ended itself.
    for rank in range(ranks - 1):
        assert (f"rank {rank}: still exiting {TIMEOUT_S} s after a failed collective "
                f"(MPI_Finalize waits for rank {stopped})") in result.stderr, out
    assert result.returncode != 0, out


# --------------------------------------------------------------- a dead peer on the ring
def _ring_reports(tmp_path: Path, mode: str, launches: int, env: dict | None = None) -> list[dict]:
    """Reports of rank 0 over up to ``launches`` launches of ``mode`` (stopping at the first
    PeerFailure). Under -disable-auto-cleanup MPICH's hydra still SIGKILLs the survivors now
    and then, sometimes before rank 0 has seen the failure (observed with MPICH 5.0.2): such
    a launch says nothing about pybrain-mpi and leaves no report."""
    reports = []
    for attempt in range(launches):
        run_dir = tmp_path / f"{mode}{attempt}"
        run_dir.mkdir()
        result, _ = launch(2, [str(WORKERS / "failure_worker.py"), mode, str(run_dir)], run_dir,
                           limit_s=3 * TIMEOUT_S + 40, env=env,
                           mpiexec_args=("-disable-auto-cleanup",))
        assert "NO ERROR" not in result.stdout, result.stdout + result.stderr
        report = run_dir / "report0.txt"
        if report.exists():
            reports += caught(report.read_text())
            if reports[-1]["type"] == "PeerFailure":
                break
        else:
            print(f"{mode} launch {attempt + 1}: rank 0 was killed by the launcher before it "
                  "reported")
    assert reports, f"rank 0 never reported in {launches} launches"
    for found in reports:
        assert found["rank"] == 0, found
        # MPICH fails the transfer (PeerFailure), or never completes it (the deadline); a raw
        # MPI error (PbmError) naming no peer is what must not happen.
        assert found["type"] in ("PeerFailure", "CollectiveTimeout"), found
        assert found["ranks"] == [1], found
        assert re.search(r"(waiting for|not joined:) rank 1\b", found["message"]), found
        assert "grad.big" in found["message"], found
    return reports


def test_a_peer_killed_after_joining_an_allreduce_on_the_two_rank_ring_is_named(tmp_path):
    _ring_reports(tmp_path, "ring_peer_killed", launches=4)


def test_a_peer_killed_mid_transfer_on_the_two_rank_ring_is_named_not_a_raw_mpi_error(tmp_path):
    reports = _ring_reports(tmp_path, "ring_peer_killed_mid_transfer", launches=5,
                            env={"PBM_RING_CHUNK_BYTES": "262144"})
    print("rank 0 reported:", [r["type"] for r in reports])
    failures = [r for r in reports if r["type"] == "PeerFailure"]
    for found in failures:
        assert "the MPI library reported an error" in found["message"], found


# --------------------------------------------------------------- the trainer
def _start_pid(output: Path, rank: int) -> int:
    lines = (output / "logs" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"event": "start"' in line][-1]["pid"]


def _train(tmp_path: Path, env: dict, mpiexec_args: tuple[str, ...] = ()):
    output = tmp_path / "run"
    config = write_config(tmp_path / "cfg.toml", output, tmp_path / "cache", precision="fp32",
                          extra_train="checkpoint_every = 1")
    process = launch_training(config, "--steps", "400", mpiexec_args=mpiexec_args,
                              env={"PBM_TIMEOUT_S": str(TIMEOUT_S), "PBM_EXIT_TIMEOUT_S": str(TIMEOUT_S), **env})
    return process, output


def _wait_for(condition, process, what: str, pids, limit_s: float = 150) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before {what}:\n"
                        + "\n".join(process.communicate()))
        if time.monotonic() > deadline:
            _end(pids())
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(process.communicate()))
        time.sleep(0.02)


def _finish(process, pids: list[int], limit_s: float) -> tuple[str, str, float]:
    started = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _end(pids)
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"training still running {limit_s} s after the fault\nstdout:\n{stdout}\n"
                    f"stderr:\n{stderr}")
    finally:
        _end(pids)
    return stdout, stderr, time.monotonic() - started


def test_rank_stopped_while_rank0_writes_a_checkpoint_gives_a_timeout_naming_it(tmp_path):
    # Every checkpoint write pauses 2 s half-way through its temporary file.
    process, output = _train(tmp_path, {"PBM_CHECKPOINT_WRITE_DELAY_S": "2"})
    checkpoints = output / "checkpoints"
    logs = output / "logs"
    pids = lambda: [_start_pid(output, r) for r in (0, 1)  # noqa: E731
                    if (logs / f"rank{r}.jsonl").exists()]
    _wait_for(lambda: len(pids()) == 2 and step_lines(output, 0)
              and any(checkpoints.glob(".checkpoint.pt.*.tmp")), process,
              "rank 0 writing a checkpoint", pids)
    rank1 = _start_pid(output, 1)
    os.kill(rank1, signal.SIGSTOP)
    stdout, stderr, elapsed = _finish(process, pids(), limit_s=4 * TIMEOUT_S + 40)
    assert process.returncode != 0, stdout + stderr
    message = re.search(r"pybrain-mpi train: error: (rank 0: .*)", stderr)
    assert message, stderr
    text = message[1]
    assert "checkpoint" in text and re.search(r"(waiting for|not joined:) rank 1\b", text), stderr
    assert elapsed <= 3 * TIMEOUT_S + 30, (elapsed, stderr)


def test_sigusr1_while_a_peer_process_has_ended_is_a_failure_notice_not_a_stop_request(capfd):
    """What mpiexec -disable-auto-cleanup does to survivors (SIGUSR1 after a rank's process
    ended), with a real SIGKILLed peer process and a real SIGUSR1; a SIGUSR1 while every peer
    lives stays a preemption request."""
    import pybrain_mpi as pbm
    from pybrain_mpi.trainer.signals import StopRequest, process_identity

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = process_identity()
        identities = [me, (me[0], peer.pid, _ticks(peer.pid))]
        with StopRequest(0) as alive:
            alive.watch_peers(identities)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert alive.requested == signal.SIGUSR1 and alive.lost_ranks == []
            alive.check_peers()  # nothing lost: no error
        peer.kill()
        peer.wait()
        with StopRequest(0) as notice:
            notice.watch_peers(identities)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert notice.requested == 0 and notice.lost_ranks == [1]
            with pytest.raises(pbm.PeerFailure, match=r"rank 1 ended .*MPICH") as error:
                notice.check_peers()
            assert error.value.failed_ranks == [1]
        assert "not a preemption request" in capfd.readouterr().err
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()


def test_process_ended_tells_a_live_process_from_a_dead_one(tmp_path):
    from pybrain_mpi.trainer.signals import process_ended, process_identity

    assert not process_ended(process_identity())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = (process_identity()[0], child.pid, _ticks(child.pid))
        assert not process_ended(identity)
        assert process_ended((identity[0], child.pid, identity[2] + 1))  # pid reused later
        child.kill()
        child.wait()
        assert process_ended(identity)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _ticks(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2:].split()[19])


# --------------------------------------------------------------- a rank absent from set-up
@pytest.mark.parametrize("mode,ranks,what", [
    ("init", 2, "pybrain_mpi.init waits for every rank"),
    ("init", 3, "pybrain_mpi.init waits for every rank"),
    ("group", 2, "pybrain_mpi.parallel.Group set-up"),
    ("p2p", 2, "pybrain_mpi.parallel.Channel set-up"),
])
def test_a_rank_absent_from_set_up_is_named_and_the_others_exit_without_it(tmp_path, mode, ranks, what):
    """pbm.init, Group and Channel meet every rank in a rendezvous bounded by PBM_TIMEOUT_S
    before their blocking MPI set-up; the last rank sleeps through it (6x the timeout)."""
    result, elapsed = launch(ranks, [str(WORKERS / "init_failure_worker.py"), mode, str(tmp_path)],
                             tmp_path, limit_s=4 * TIMEOUT_S + 40)
    out = result.stdout + result.stderr
    absent = ranks - 1
    assert_timeouts_name(result, absent, [f"rank {absent} did not arrive", what])
    assert "LATE RANK EXITS" not in out and "NO ERROR" not in out  # nobody waited for it
    assert result.returncode != 0, out
