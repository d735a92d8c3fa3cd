"""Checkpoints that are written atomically and loaded without unpickling arbitrary objects.

A checkpoint file holds one nested dict of tensors and plain values (numbers, strings,
booleans, None, lists, tuples, dicts) plus JSON metadata:

    {"format": "pybrain-mpi-checkpoint", "version": 1,
     "metadata_json": "...",                       # step, epoch, config, ... (JSON text)
     "model": {"class": "pkg.mod.Class", "state": {name: tensor}},
     ...whatever else the caller stores: "optimizer", "scaler", "compression",
        "sampler", "rng" (see rng_state) ...}

**Writing** (:func:`save_checkpoint`): the tree is checked first (a value that
``torch.load(weights_only=True)`` could not read back is an error naming its key, before any
file is touched); then it is written to a temporary file in the target directory, flushed
and fsynced, the current checkpoint (if any) is hard-linked to ``<name>.prev``, and the
temporary file is renamed over ``<name>`` (``os.replace``, atomic within a file system)
and the directory fsynced. A crash at any point leaves ``<name>`` either the old complete
checkpoint or the new complete one, never a partial file.

**Integrity.** The file carries a SHA-256 of its content (every key path, tensor dtype, shape
and bytes, every plain value, the metadata), computed before writing and checked after
reading, so a flipped or truncated byte anywhere in the data is refused naming the file
instead of loading silently. Before writing, the free space of the target file system is
checked against the checkpoint's size; a full disk (then, or during the write) is reported as
such, and the previous checkpoint stays in place and loadable.

**Reading** (:func:`load_checkpoint`): ``torch.load(weights_only=True)`` only, so a file
that contains any other object (a pickled class, a function call) is refused rather than
executed. With a target model, the stored model class and every parameter/buffer name and
shape must match before anything is copied; the error names the first mismatching key.

**RNG states** (:func:`rng_state` / :func:`set_rng_state`): torch's CPU generator, numpy's
global generator and Python's ``random`` as tensors and plain ints, so a resumed run draws
the same random numbers.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PbmError

__all__ = ["CheckpointError", "CheckpointMismatch", "CheckpointDiskFull", "content_checksum", "FORMAT", "VERSION", "save_checkpoint",
           "load_checkpoint", "model_entry", "check_model_matches", "rng_state",
           "set_rng_state", "derive_rng_state", "previous_path", "remove_stale_temporaries"]

FORMAT = "pybrain-mpi-checkpoint"
VERSION = 2  # 2 added the content checksum; version 1 files still load (unchecked)
_READABLE_VERSIONS = (1, 2)
_RESERVED = ("format", "version", "metadata_json", "checksum")
_SPACE_MARGIN_BYTES = 1 << 20  # zip headers, pickled structure, metadata


class CheckpointError(PbmError, ValueError):
    """A checkpoint cannot be written or read (bad content, unreadable file)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint belongs to a different model (class, parameter names or shapes)."""


class CheckpointDiskFull(CheckpointError, OSError):
    """The checkpoint's file system has no room for it; the previous checkpoint is intact."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``<name>.prev``."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _class_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def model_entry(model: nn.Module) -> dict:
    """``{"class": qualified class name, "state": state_dict}`` for a checkpoint's "model"."""
    return {"class": _class_name(model),
            "state": {k: v.detach() for k, v in model.state_dict().items()}}


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of ``model``'s floating-point state entries that hold a NaN or Inf (a diverged
    model is never written over a good checkpoint)."""
    return [name for name, p in model.state_dict().items()
            if p.is_floating_point() and not torch.isfinite(p).all()]


def _check_tree(value: Any, key: str) -> Any:
    """Return ``value`` with tensors detached; raise naming ``key`` on anything not loadable."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"checkpoint key {key}[{k!r}]: dict keys must be strings or "
                                      f"integers, got {type(k).__name__}")
            out[k] = _check_tree(v, f"{key}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [_check_tree(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    hint = " (convert numpy arrays with torch.from_numpy)" if isinstance(value, np.ndarray) else ""
    raise CheckpointError(f"checkpoint value {key} is a {type(value).__module__}."
                          f"{type(value).__qualname__}; only tensors, numbers, strings, "
                          f"booleans, None, lists, tuples and dicts can be stored{hint}")


def _hash_tree(h, value: Any, key: str) -> None:
    """Feeds one checkpoint value into the content hash, with its key path and type."""
    h.update(key.encode())
    if isinstance(value, torch.Tensor):
        flat = value.detach().contiguous().reshape(-1)
        h.update(f"tensor {flat.dtype} {tuple(value.shape)}".encode())
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        h.update(b"dict")
        for k, v in value.items():
            _hash_tree(h, v, f"{key}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        h.update(type(value).__name__.encode())
        for i, v in enumerate(value):
            _hash_tree(h, v, f"{key}[{i}]")
    else:
        h.update(f"{type(value).__name__} {value!r}".encode())


def content_checksum(tree: dict) -> str:
    """SHA-256 (hex) of a checkpoint's content, the reserved format keys excluded."""
    h = hashlib.sha256()
    for k in sorted(k for k in tree if k not in ("format", "version", "checksum")):
        _hash_tree(h, tree[k], k)
    return h.hexdigest()


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _disk_full(path: Path, needed: int, free: int) -> CheckpointDiskFull:
    return CheckpointDiskFull(
        f"disk full (No space left on device): checkpoint {path} needs about {needed / 2**20:.1f} MiB but {path.parent} "
        f"has {free / 2**20:.1f} MiB free; the previous checkpoint {path} is unchanged. Free "
        "space or set [train] checkpoint_dir to another file system")


def _is_no_space(error: BaseException | None, directory: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in the chain, or (torch's
    stream writer says only "file write failed") the file system now has less than needed."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some file systems do not allow opening directories; the rename still held
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict, metadata: dict | None = None,
                    keep_previous: bool = True) -> Path:
    """Atomically write ``state`` (nested tensors/plain values) and JSON ``metadata`` to ``path``.

    With ``keep_previous`` the checkpoint being replaced stays available as ``<name>.prev``.
    Nothing is touched when the content is invalid; on any error the temporary file is
    removed and the existing checkpoint is left as it was. Returns ``path``.
    """
    path = Path(path)
    for key in _RESERVED:
        if key in state:
            raise CheckpointError(f"checkpoint key '{key}' is reserved; rename it")
    tree = {k: _check_tree(v, k) for k, v in state.items()}
    try:
        metadata_json = json.dumps(metadata or {}, allow_nan=True, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {exc}") from None
    tree["metadata_json"] = metadata_json
    tree.update(format=FORMAT, version=VERSION, checksum=content_checksum(tree))

    needed = _tensor_bytes(tree) + len(metadata_json) + _SPACE_MARGIN_BYTES
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}; choose a writable "
                              "checkpoint_dir") from None
    if free < needed:
        raise _disk_full(path, needed, free)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if _is_no_space(exc, path.parent, needed):
            raise _disk_full(path, needed, shutil.disk_usage(path.parent).free) from None
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}; choose a writable "
                              "checkpoint_dir") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            delay_s = float(os.environ.get("PBM_CHECKPOINT_WRITE_DELAY_S", "0"))
            if delay_s > 0:
                # Test hook: write half the file, pause, write the rest, so a test can kill
                # the process while the temporary file is half-written.
                buffer = io.BytesIO()
                torch.save(tree, buffer)
                data = buffer.getbuffer()
                f.write(data[:len(data) // 2])
                f.flush()
                time.sleep(delay_s)
                f.write(data[len(data) // 2:])
            else:
                torch.save(tree, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            # Hard-link the old file under a temp name, then rename it to .prev: <name>
            # itself is never missing, and .prev is always a complete file.
            prev_tmp = tmp.with_name(tmp.name + ".prev")
            os.link(path, prev_tmp)
            os.replace(prev_tmp, previous_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        for leftover in (tmp, tmp.with_name(tmp.name + ".prev")):
            if leftover.exists():
                leftover.unlink()
        if isinstance(exc, Exception) and _is_no_space(exc, path.parent, needed):
            raise _disk_full(path, needed, shutil.disk_usage(path.parent).free) from None
        raise
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed :func:`save_checkpoint` left beside ``path``.

    A write interrupted by SIGKILL (or a node failure) leaves ``.<name>.*.tmp`` (and its
    ``.prev`` link) behind; ``<name>`` itself is intact. Only call this while no other
    process writes checkpoints to the same path. Returns the removed paths.
    """
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{path.name}.*.tmp*"):
        try:
            leftover.unlink()
            removed.append(leftover)
        except OSError:
            pass  # gone already, or not ours to delete: the next write uses a fresh name
    return removed


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, strict_class: bool = True):
    """Read a checkpoint safely; return ``(state, metadata)``.

    Uses ``torch.load(weights_only=True)`` only. With ``model``, checks the stored model class
    (when ``strict_class``) and every state-dict name and shape, then loads the weights; with
    ``optimizer``, loads the stored "optimizer" state as well. Raises :class:`CheckpointError`
    for unreadable or unsafe files and :class:`CheckpointMismatch` for another model's file.
    """
    path = Path(path)
    if not path.is_file():
        prev = previous_path(path)
        extra = f" (the previous one is {prev})" if prev.is_file() else ""
        raise CheckpointError(f"checkpoint {path} does not exist{extra}")
    try:
        with warnings.catch_warnings():
            # Foreign pickles trigger a protocol warning; they are rejected below anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            tree = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long advice about weights_only=False (which we never do); keep
        # only the line that names the offending global, e.g. "posix.system".
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "global" in line.lower()),
                      lines[0] if lines else "unsupported content")
        raise CheckpointError(f"refusing to load {path}: it contains objects other than tensors "
                              f"and plain values, which could run code when unpickled "
                              f"({detail}). Only load files written by "
                              "pybrain-mpi's save_checkpoint.") from None
    except Exception as exc:  # truncated/corrupt zip, wrong format
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}; "
                              f"if it is damaged, resume from {previous_path(path)}") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pybrain-mpi checkpoint (no '{FORMAT}' marker)")
    if tree.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format version {tree.get('version')}; this "
                              f"pybrain-mpi reads versions {', '.join(map(str, _READABLE_VERSIONS))}")
    if tree.get("version") >= 2:
        stored = tree.get("checksum")
        if not isinstance(stored, str) or stored != content_checksum(tree):
            raise CheckpointError(f"checkpoint {path} is corrupted: its content does not match "
                                  f"the checksum written with it; resume from "
                                  f"{previous_path(path)} or an older checkpoint")
    metadata = json.loads(tree.pop("metadata_json"))
    for key in ("format", "version", "checksum"):
        tree.pop(key, None)
    if model is not None:
        check_model_matches(tree, model, path, strict_class=strict_class)
        model.load_state_dict(tree["model"]["state"])
    if optimizer is not None:
        if "optimizer" not in tree:
            raise CheckpointError(f"{path} holds no optimizer state")
        try:
            optimizer.load_state_dict(tree["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointMismatch(f"{path}: optimizer state does not fit this optimizer: "
                                     f"{exc}") from None
    return tree, metadata


def check_model_matches(state: dict, model: nn.Module, path: str | os.PathLike = "checkpoint",
                        strict_class: bool = True) -> None:
    """Raise :class:`CheckpointMismatch` unless ``state["model"]`` fits ``model`` exactly.

    Compares the class, then names and shapes in the model's state-dict order, and names the
    first key that is missing, unexpected or of another shape.
    """
    entry = state.get("model")
    if not isinstance(entry, dict) or "state" not in entry:
        raise CheckpointMismatch(f"{path} holds no model state")
    stored_class, target_class = entry.get("class"), _class_name(model)
    if strict_class and stored_class != target_class:
        raise CheckpointMismatch(f"{path} was written for model {stored_class}, not "
                                 f"{target_class}; point --resume at a checkpoint of this "
                                 "model or change [model] name")
    stored = entry["state"]
    target = model.state_dict()
    for key, tensor in target.items():
        if key not in stored:
            raise CheckpointMismatch(f"{path}: model key '{key}' {tuple(tensor.shape)} is missing "
                                     "from the checkpoint (different architecture?)")
        if tuple(stored[key].shape) != tuple(tensor.shape):
            raise CheckpointMismatch(f"{path}: '{key}' has shape {tuple(stored[key].shape)} in "
                                     f"the checkpoint but {tuple(tensor.shape)} in the model "
                                     "(different model arguments?)")
    for key in stored:
        if key not in target:
            raise CheckpointMismatch(f"{path}: checkpoint key '{key}' does not exist in the "
                                     "model (different architecture?)")


def rng_state() -> dict:
    """Current torch (CPU), numpy (global) and Python ``random`` states as checkpointable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()),
                     py["gauss_next"]))


def derive_rng_state(*entropy: int) -> None:
    """Seeds torch (CPU), numpy's global generator and Python's ``random`` from ``entropy``
    (e.g. seed, step, rank, world size): for a resume on another world size, where no saved
    state belongs to a rank (each rank then draws its own, reproducible numbers)."""
    words = np.random.SeedSequence([int(e) for e in entropy]).generate_state(4, dtype=np.uint32)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(int(words[2]))
    random.seed(int(words[3]))
