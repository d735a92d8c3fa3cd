"""The conversion cache: directories of Zarr stores built once, stamped, renamed into place.

Used by the shipped examples (:mod:`.examples`) and by cohorts (:mod:`.subjects`, one
directory per subject). ``$PBM_CACHE_DIR`` if set, else ``~/.cache/pybrain-mpi``.

A cache directory ``<cache>/<name>`` holds Zarr stores (``*.zarr``), any other files its
builder writes, and a stamp (:data:`STAMP_NAME`) written last: format,
:data:`CACHE_VERSION`, the source files (name, size, modification time) and a SHA-256 of
every store's decoded contents. It is built in a temporary sibling and renamed into place,
so readers never see half of one. A directory whose stamp is missing (a copy may be
partial), unreadable, of another cache version, made from other source files, or whose
stores do not match their checksums is rebuilt (with a message).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DataError

__all__ = ["CACHE_VERSION", "STAMP_NAME", "CacheError", "default_cache_dir", "ensure_cache",
           "open_cache", "read_stamp", "store_digest"]

#: Version of the cache layout; 1 was .npy files, 2 is Zarr stores with a stamp.
CACHE_VERSION = 2
#: Name of the stamp file that marks a complete cache directory.
STAMP_NAME = "pybrain-mpi-cache.json"
_STAMP_FORMAT = "pybrain-mpi-example-cache"
#: Bytes of decoded data hashed per read when a store's checksum is computed.
_DIGEST_SLAB_BYTES = 32 * 2**20


class CacheError(DataError):
    """A cache directory cannot be built, or is not (yet) usable where it is read."""


def default_cache_dir() -> Path:
    """``$PBM_CACHE_DIR`` if set, else ``~/.cache/pybrain-mpi``."""
    env = os.environ.get("PBM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pybrain-mpi"


def store_digest(path: Path) -> tuple[str, list[int], str]:
    """``(sha256 of the decoded level-0 array in C order, shape, dtype)`` of a Zarr store.

    Read through :class:`pybrain_mpi.data.Volume` slab by slab along the first axis (a slab
    of a C-ordered array is contiguous, so the digest is that of the whole array's bytes while
    memory stays at one slab); a missing or corrupt chunk raises ``ChunkError``.
    """
    from .volume import Volume

    digest = hashlib.sha256()
    with Volume(path, threads=1, cache_bytes=0) as volume:
        shape, dtype = volume.shape, volume.dtype
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        rows = max(1, _DIGEST_SLAB_BYTES // max(1, row_bytes))
        for lo in range(0, shape[0], rows):
            size = (min(rows, shape[0] - lo),) + tuple(shape[1:])
            slab = volume.read_patch((lo,) + (0,) * (len(shape) - 1), size)
            digest.update(np.ascontiguousarray(slab).data)
    return digest.hexdigest(), list(shape), str(dtype)


def read_stamp(root: Path) -> dict | None:
    """The stamp of cache directory ``root``, or None when it has none (or an unreadable one)."""
    try:
        stamp = json.loads((Path(root) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == _STAMP_FORMAT else None


def _source_record(source: Path) -> dict:
    info = source.stat()
    return {"name": source.name, "path": str(source), "size": info.st_size,
            "mtime_ns": info.st_mtime_ns}


def _sources_problem(stamp: dict, sources: list[Path]) -> str | None:
    recorded = stamp.get("sources", [])
    if len(recorded) != len(sources):
        return f"it was made from {len(recorded)} source file(s), now there are {len(sources)}"
    for entry, source in zip(recorded, sources):
        try:
            now = _source_record(source)
        except OSError:
            return f"its source {source} is gone"
        if entry.get("name") != now["name"] or entry.get("size") != now["size"]:
            return f"its source {source.name} changed (package upgraded?)"
        # Recorded since cohorts: a file rewritten in place with the same size.
        if entry.get("mtime_ns") not in (None, now["mtime_ns"]):
            return f"its source {source} was modified after the cache was built"
    return None


def _stamp_problem(root: Path, sources: list[Path], verify: bool) -> str | None:
    """Why ``root`` is not a usable cache (None when it is)."""
    if not root.exists():
        return "it does not exist yet"
    stamp = read_stamp(root)
    if stamp is None:
        return f"it has no readable {STAMP_NAME} (incomplete or from an older version)"
    if stamp.get("version") != CACHE_VERSION:
        return f"it was written by cache version {stamp.get('version')}, this is {CACHE_VERSION}"
    problem = _sources_problem(stamp, sources)
    if problem is not None:
        return problem
    for name, entry in stamp.get("stores", {}).items():
        if not (root / name).is_dir():
            return f"store {name} is missing"
        if verify:
            try:
                digest, shape, dtype = store_digest(root / name)
            except Exception as exc:  # a broken store can fail in many ways (zarr, codecs)
                return f"store {name} cannot be read ({type(exc).__name__}: {exc})"
            if (digest, shape, dtype) != (entry.get("sha256"), entry.get("shape"), entry.get("dtype")):
                return f"store {name} does not match its checksum (damaged)"
    return None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def ensure_cache(name: str, build: Callable[[Path], dict], sources: list[Path],
                 cache_dir: str | os.PathLike | None = None, verify: bool = True,
                 echo: Callable[[str], None] | None = None, what: str = "example") -> Path:
    """The cache directory ``<cache>/<name>``, built by ``build(tmp_dir)`` unless it is usable.

    ``build`` writes Zarr stores (directories ending ``.zarr``) and any other files into
    ``tmp_dir`` and returns extra stamp content (JSON-serialisable). The stamp (version,
    ``sources``, a SHA-256 of every store) is written last, then the directory is renamed
    into place; a stale directory is moved aside first and deleted afterwards. With
    ``verify`` every store is read back and checked against its checksum (a damaged cache is
    rebuilt); without it only the stamp, the sources and the stores' presence are checked.
    Exactly one process may build a given ``name`` at a time (rank 0 for the examples, the
    subject's rank for a cohort); the others use :func:`open_cache`. ``what`` names the
    kind of data in messages.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / name
    problem = _stamp_problem(root, sources, verify)
    if problem is None:
        return root
    from .. import logs

    log = logs.get_logger("data")
    if root.exists():  # a stale or damaged cache: worth a warning
        (echo or log.warning)(f"rebuilding the {what} cache {root}: {problem}")
    else:
        (echo or log.info)(f"converting the {name} {what} data to Zarr in {root} (first run)")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    except OSError as exc:
        raise CacheError(f"cannot write the {what} cache in {root.parent}: {exc}; set "
                         "PBM_CACHE_DIR or [data] cache_dir to a writable directory") from None
    old = None
    try:
        extra = build(tmp)
        stores = {}
        for store in sorted(p for p in tmp.iterdir() if p.name.endswith(".zarr")):
            digest, shape, dtype = store_digest(store)
            stores[store.name] = {"sha256": digest, "shape": shape, "dtype": dtype}
        stamp = {"format": _STAMP_FORMAT, "version": CACHE_VERSION, "name": name,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "sources": [_source_record(s) for s in sources],
                 "stores": stores, **extra}
        with open(tmp / STAMP_NAME, "w") as f:
            json.dump(stamp, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is read like any data
        if root.exists():
            old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".old"))
            os.replace(root, old / "stale")
        os.replace(tmp, root)
    except OSError as exc:
        _remove_tree(tmp)
        raise CacheError(f"cannot write the {what} cache {root}: {exc}; set "
                         "PBM_CACHE_DIR or [data] cache_dir to a writable directory") from None
    except BaseException:
        _remove_tree(tmp)
        raise
    finally:
        if old is not None:
            _remove_tree(old)
    return root


def open_cache(name: str, cache_dir: str | os.PathLike | None = None,
               wait_s: float = 0.0, what: str = "example") -> tuple[Path, dict]:
    """``(directory, stamp)`` of a cache built by :func:`ensure_cache`, without building it.

    Waits up to ``wait_s`` for the stamp to appear (another process may be renaming it into
    place, or a shared file system may show it late), then raises :class:`CacheError`
    saying what to do.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / name
    deadline = time.monotonic() + wait_s
    while True:
        stamp = read_stamp(root)
        if stamp is not None and stamp.get("version") == CACHE_VERSION:
            return root, stamp
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise CacheError(
        f"the {name} {what} cache {root} is not there (or not complete) after {wait_s:.0f} s; "
        "it is built by another rank: on several nodes [data] cache_dir (or PBM_CACHE_DIR) must "
        "be on a file system every node shares")
