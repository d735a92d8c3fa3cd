"""Checkpoints: atomic replacement, safe loading, model validation, exact RNG round trip."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from pybrain_mpi.trainer import checkpoint as ckpt
from pybrain_mpi.models import DCA, EncodingMLP


def _state(model, optimizer=None, step=0):
    state = {"model": ckpt.model_entry(model), "sampler": {"epoch": 1, "position": step}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return state


def _trained(seed=0):
    torch.manual_seed(seed)
    model = EncodingMLP(6, (5, 4), 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_nested_state_and_metadata(tmp_path):
    model, opt = _trained()
    state = _state(model, opt, step=7)
    state["compression"] = {"residuals": [torch.arange(3.0), torch.zeros(2)], "s": 1.5}
    path = ckpt.save_checkpoint(tmp_path / "run.pt", state, {"step": 7, "loss": [0.5, 0.25]})
    fresh, fresh_opt = _trained(seed=1)
    loaded, meta = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert meta == {"step": 7, "loss": [0.5, 0.25]}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])
    assert loaded["sampler"] == {"epoch": 1, "position": 7}
    assert torch.equal(loaded["compression"]["residuals"][0], torch.arange(3.0))


def test_second_save_keeps_the_first_as_prev(tmp_path):
    model, _ = _trained()
    path = tmp_path / "run.pt"
    ckpt.save_checkpoint(path, _state(model, step=1), {"step": 1})
    ckpt.save_checkpoint(path, _state(model, step=2), {"step": 2})
    assert ckpt.load_checkpoint(path)[1] == {"step": 2}
    assert ckpt.load_checkpoint(ckpt.previous_path(path))[1] == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt", "run.pt.prev"]


def test_crash_between_write_and_replace_leaves_old_checkpoint_intact(tmp_path):
    model, _ = _trained()
    path = tmp_path / "run.pt"
    ckpt.save_checkpoint(path, _state(model, step=1), {"step": 1})
    before = path.read_bytes()
    pid = os.fork()
    if pid == 0:  # child: the new file is fully written, then the process dies at the rename
        real_replace = os.replace

        def die_before_final_rename(src, dst):
            if str(dst) == str(path):
                os._exit(17)
            real_replace(src, dst)
        os.replace = die_before_final_rename
        try:
            ckpt.save_checkpoint(path, _state(model, step=2), {"step": 2})
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 17
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path, model)[1] == {"step": 1}
    # The dead writer's temporary file is left behind but never mistaken for the checkpoint.
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_failed_write_removes_its_temp_file_and_keeps_old(tmp_path, monkeypatch):
    model, _ = _trained()
    path = tmp_path / "run.pt"
    ckpt.save_checkpoint(path, _state(model, step=1), {"step": 1}, keep_previous=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(path, _state(model, step=2), {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]
    assert ckpt.load_checkpoint(path)[1] == {"step": 1}


def test_invalid_content_is_rejected_before_any_file_is_touched(tmp_path):
    model, _ = _trained()
    path = tmp_path / "run.pt"
    ckpt.save_checkpoint(path, _state(model), {"step": 1})
    before = path.read_bytes()
    state = _state(model)
    state["sampler"]["order"] = np.arange(4)
    with pytest.raises(ckpt.CheckpointError, match=r"sampler\['order'\].*torch.from_numpy"):
        ckpt.save_checkpoint(path, state)
    with pytest.raises(ckpt.CheckpointError, match="JSON"):
        ckpt.save_checkpoint(path, _state(model), {"when": object()})
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_refuses_a_pickle_with_an_arbitrary_object(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "metadata_json": "{}",
                "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load .*system"):
        ckpt.load_checkpoint(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"x": _RunsCodeWhenUnpickled(marker)}))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(raw)
    assert not marker.exists()


def test_checkpoint_of_another_model_class_is_refused(tmp_path):
    model, _ = _trained()
    path = ckpt.save_checkpoint(tmp_path / "run.pt", _state(model))
    with pytest.raises(ckpt.CheckpointMismatch, match="EncodingMLP, not .*DCA"):
        ckpt.load_checkpoint(path, DCA(40, 8))


def test_shape_mismatch_names_the_first_differing_key(tmp_path):
    model, _ = _trained()
    path = ckpt.save_checkpoint(tmp_path / "run.pt", _state(model))
    other = EncodingMLP(6, (5, 7), 3)
    before = [t.clone() for t in other.state_dict().values()]
    with pytest.raises(ckpt.CheckpointMismatch,
                       match=r"'layers\.3\.weight' has shape \(4, 5\) in the checkpoint but "
                             r"\(7, 5\)"):
        ckpt.load_checkpoint(path, other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.state_dict().values()))


def test_missing_key_is_named(tmp_path):
    model, _ = _trained()
    path = ckpt.save_checkpoint(tmp_path / "run.pt", _state(model))
    no_bn = EncodingMLP(6, (5, 4), 3, batch_norm=False)
    with pytest.raises(ckpt.CheckpointMismatch, match=r"'layers\.2\.weight'|does not exist"):
        ckpt.load_checkpoint(path, no_bn)


def test_rng_round_trip_reproduces_the_same_random_numbers(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    random.gauss(0, 1)      # leaves a cached gaussian in Python's generator
    np.random.standard_normal()
    path = ckpt.save_checkpoint(tmp_path / "rng.pt", {"rng": ckpt.rng_state()})
    expected = (torch.rand(5), np.random.standard_normal(5), [random.gauss(0, 1) for _ in range(3)],
                random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    state, _ = ckpt.load_checkpoint(path)
    ckpt.set_rng_state(state["rng"])
    got = (torch.rand(5), np.random.standard_normal(5), [random.gauss(0, 1) for _ in range(3)],
           random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]


def test_missing_or_foreign_file_errors_are_clear(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a pybrain-mpi checkpoint"):
        ckpt.load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(tmp_path / "cut.pt")


# ------------------------------------------------------------------ integrity and disk space
def _pattern_state(n: int = 65536) -> dict:
    # Synthetic on purpose: a constant tensor whose bytes can be found in the file.
    return {"model": {"class": "x.Y", "state": {"w": torch.full((n,), 1.5)}}}


def test_a_flipped_byte_in_tensor_data_is_refused_naming_the_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "run.pt", _pattern_state(), {"step": 3})
    raw = bytearray(path.read_bytes())
    marker = torch.full((16,), 1.5).numpy().tobytes()
    at = raw.find(marker)
    assert at > 0
    raw[at + 5] ^= 0x10  # one bit of one float: torch.load alone reads this back silently
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["model"]["state"]["w"][1].item() != 1.5
    with pytest.raises(ckpt.CheckpointError, match=f"{path.name} is corrupted"):
        ckpt.load_checkpoint(path)


def test_checksum_covers_metadata_and_plain_values(tmp_path):
    state = {**_pattern_state(8), "progress": {"step": 7, "name": "a"}}
    tree = {**state, "metadata_json": "{}"}
    base = ckpt.content_checksum(tree)
    assert ckpt.content_checksum({**tree, "metadata_json": '{"a": 1}'}) != base
    assert ckpt.content_checksum({**tree, "progress": {"step": 8, "name": "a"}}) != base
    assert ckpt.content_checksum(dict(tree)) == base


def test_too_little_free_space_is_reported_as_a_full_disk_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "run.pt", _pattern_state(), {"step": 1})
    real = ckpt.shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=4096))
    with pytest.raises(ckpt.CheckpointError, match=r"disk full \(No space left on device\): .*run.pt needs about 1.3 MiB .* has 0.0 MiB free"):
        ckpt.save_checkpoint(path, _pattern_state(), {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)[1] == {"step": 1}
    assert not list(tmp_path.glob(".run.pt.*"))


def test_running_out_of_space_during_the_write_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "run.pt", _pattern_state(), {"step": 1})
    real_fdopen = ckpt.os.fdopen

    class FillsUp:
        """A file that accepts 100 KB and then fails as a full disk does."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100_000:
                raise OSError(ckpt.errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(ckpt.CheckpointError, match="disk full"):
        ckpt.save_checkpoint(path, _pattern_state(), {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)[1] == {"step": 1}
    assert not list(tmp_path.glob(".run.pt.*"))


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 2 MiB tmpfs (needs root and mount permission, as in CI)."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the monkeypatched "
                    "disk-full tests above cover the same code")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_file_system_keeps_the_previous_checkpoint_loadable(tiny_filesystem, monkeypatch):
    path = tiny_filesystem / "run.pt"
    ckpt.save_checkpoint(path, _pattern_state(1 << 17), {"step": 1})   # 0.5 MiB
    # Claim plenty of room so the write itself runs out of space (as when another process
    # fills the disk between the check and the write).
    real = ckpt.shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    with pytest.raises(ckpt.CheckpointDiskFull, match="disk full"):
        ckpt.save_checkpoint(path, _pattern_state(1 << 19), {"step": 2})  # 2 MiB
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)[1] == {"step": 1}
    assert sorted(p.name for p in tiny_filesystem.iterdir()) == ["run.pt"]
