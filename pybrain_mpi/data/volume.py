"""On-demand patch reading from a Zarr v3 / OME-Zarr volume.

:class:`Volume` reads only the chunks a patch intersects, decodes them in a thread pool and
keeps them in an LRU cache bounded in bytes. Counters report how many bytes were decoded from
the store for the bytes handed back, so read amplification is measured, not guessed.

Fast path: for chunks stored with the codecs :func:`pybrain_mpi.data.convert` writes
(bytes + Blosc, or bytes + zstd, or bytes alone) the chunk's raw bytes are fetched from the
store (a plain file read for local stores) and decoded with numcodecs directly, skipping
zarr's per-call machinery (about 3x the decoding cost on small chunks). Any other layout
(sharding, transposes, filters) goes through zarr's own indexing, chunk by chunk.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import numpy as np

from .convert import ATTRS_KEY
from .errors import ChunkError, PatchOutOfBounds

__all__ = ["Volume", "chunks_touched", "auto_cache_bytes"]

#: Automatic cache sizing (``Volume(cache_bytes=None)``): room for the chunks of this many
#: patches of the largest size read so far ... (8, not 4: random 64^3 patches on 32^3 chunks
#: of the 1 mm MNI152 T1 then re-read 0.36 decoded bytes per byte returned once warm, 1.5 with
#: 4, when every chunk was charged its full size; 27 MiB of float32 chunks. With constant
#: chunks charged one element, 27 MiB holds the whole brain in 16 MiB: 0.03-0.08 warm;
#: ``benchmarks/patches.py --only-amplification``)
AUTO_CACHE_PATCHES = 8
#: ... never more than this (the memory budget), nor more than the whole level ...
AUTO_CACHE_BUDGET = 512 * 2**20
#: ... and at least this much before the first patch (a few default 64^3 float32 chunks).
AUTO_CACHE_FLOOR = 8 * 2**20
#: Bookkeeping charged per cached chunk (a constant chunk holds one element).
_ENTRY_BYTES = 256
#: Shard indexes kept per level (a 4^3-chunk shard's index is 1 KiB).
_MAX_SHARD_INDEXES = 4096
_EMPTY = np.uint64(2**64 - 1)


def chunks_touched(size: Sequence[int], chunks: Sequence[int], shape: Sequence[int]) -> int:
    """Most chunks a patch of ``size`` can intersect on a grid of ``chunks`` over ``shape``:
    per axis a window of n voxels starting anywhere touches at most ``(n + c - 2) // c + 1``
    chunks (never more than the axis has)."""
    total = 1
    for n, c, d in zip(size, chunks, shape):
        n = min(int(n), int(d))
        total *= min(-(-int(d) // int(c)), (n + c - 2) // c + 1)
    return total


def auto_cache_bytes(size: Sequence[int], chunks: Sequence[int], shape: Sequence[int], itemsize: int,
                     *, patches: int = AUTO_CACHE_PATCHES, budget: int = AUTO_CACHE_BUDGET) -> int:
    """Cache capacity the automatic sizing picks for patches of ``size``: the decoded chunks of
    ``patches`` worst-case patches, capped by ``budget`` and by the whole level (caching more
    than every chunk buys nothing), and at least ``AUTO_CACHE_FLOOR`` (within those caps)."""
    chunk_bytes = int(np.prod(chunks)) * int(itemsize)
    grid = int(np.prod([-(-int(d) // int(c)) for d, c in zip(shape, chunks)]))
    want = max(AUTO_CACHE_FLOOR, patches * chunks_touched(size, chunks, shape) * chunk_bytes)
    return int(min(want, budget, grid * chunk_bytes))


def _constant_view(block: np.ndarray) -> np.ndarray:
    """``block`` itself, or, when every element has the same bit pattern (background air,
    empty label chunks: 61% of the 32^3 chunks of the MNI152 T1), a read-only broadcast of
    its first element that holds no chunk-sized memory. Bit patterns, not values, are compared
    so -0.0 and NaN payloads come back exactly."""
    bits = block.reshape(-1).view(np.dtype(f"u{block.dtype.itemsize}")) \
        if block.dtype.itemsize in (1, 2, 4, 8) else None
    if bits is None or not (bits == bits[0]).all():
        return block
    return np.broadcast_to(block.reshape(-1)[:1].copy().reshape((1,) * block.ndim), block.shape)


def _held_bytes(block: np.ndarray) -> int:
    """Memory a cached chunk holds: its bytes, or one element for a constant broadcast."""
    return block.itemsize if block.ndim and not any(block.strides) else block.nbytes


class _ChunkCache:
    """LRU cache of decoded chunks, bounded in bytes, with in-flight de-duplication so two
    threads asking for the same chunk decode it once."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = int(capacity_bytes)
        self.used_bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._inflight: dict = {}
        self._lock = threading.Lock()

    def get_or_claim(self, key):
        """Returns ("hit", array), ("wait", future) or ("load", future-to-fulfil)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return "hit", item[0]
            fut = self._inflight.get(key)
            if fut is not None:
                return "wait", fut
            fut = Future()
            self._inflight[key] = fut
            return "load", fut

    def peek(self, key):
        """The cached value (marked recently used) or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def fulfil(self, key, value: np.ndarray | None, error: BaseException | None = None):
        with self._lock:
            fut = self._inflight.pop(key)
            # Charged what it holds (plus a nominal entry cost), so constant chunks cost
            # next to nothing and the capacity bounds real memory.
            cost = _held_bytes(value) + _ENTRY_BYTES if error is None else 0
            if error is None and cost <= self.capacity_bytes:
                self._items[key] = (value, cost)
                self.used_bytes += cost
                while self.used_bytes > self.capacity_bytes:
                    _, (_, old_cost) = self._items.popitem(last=False)
                    self.used_bytes -= old_cost
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def grow(self, capacity_bytes: int) -> None:
        """Raises the capacity (never lowers it: a shrink would evict under readers' feet)."""
        with self._lock:
            self.capacity_bytes = max(self.capacity_bytes, int(capacity_bytes))

    def clear(self):
        with self._lock:
            self._items.clear()
            self.used_bytes = 0


class _Level:
    """One resolution level: its zarr array and how to fetch and decode its chunks."""

    def __init__(self, array, store_url: str):
        from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec, ZstdCodec

        self.array = array
        self.decoder = None
        self.shape = tuple(int(n) for n in array.shape)
        self.chunks = tuple(int(c) for c in array.chunks)  # inner chunks when sharded
        self.dtype = np.dtype(array.dtype)
        self.store_url = store_url
        self.fill_value = array.metadata.fill_value
        self.chunk_nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self.decoder = None
        self.byte_dtype = self.dtype
        self._init_sharding(None)
        codecs = list(getattr(array.metadata, "codecs", []))
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            index = [type(c).__name__ for c in sharding.index_codecs]
            if index in (["BytesCodec"], ["BytesCodec", "Crc32cCodec"]) and \
                    getattr(sharding.index_codecs[0].endian, "value", "little") == "little":
                self._init_sharding({"shards": tuple(int(s) for s in array.shards),
                                     "crc32c": len(index) == 2,
                                     "at_end": sharding.index_location.value == "end"})
                codecs = list(sharding.codecs)
        fast = ((getattr(array, "shards", None) is None or self.shard_shape is not None)
                and codecs and isinstance(codecs[0], BytesCodec)
                and all(isinstance(c, (BloscCodec, ZstdCodec)) for c in codecs[1:])
                and len(codecs) <= 2)
        store = array.store
        self.local_root = None
        root = getattr(store, "root", None)
        if root is not None and type(store).__name__ == "LocalStore":
            self.local_root = str(root)
        # Inner chunks are fetched by byte range from local shard files only.
        self.fast = bool(fast) and (self.shard_shape is None or self.local_root is not None)
        if self.fast:
            endian = codecs[0].endian
            self._set_decoder(None if endian is None else endian.value,
                              None if len(codecs) < 2 else
                              ("blosc" if isinstance(codecs[1], BloscCodec) else "zstd"))
        self.prefix = array.store_path.path
        self._encode_key = array.metadata.encode_chunk_key

    def _init_sharding(self, sharding: dict | None) -> None:
        """Zarr v3 sharding (``sharding_indexed``): ``chunks`` are the inner chunks, each shard
        file ends (or starts) with an index of (offset, nbytes) little-endian uint64 pairs per
        inner chunk, C order, optionally followed by its CRC32C; 2^64-1 marks an empty chunk."""
        self.shard_shape = None if sharding is None else sharding["shards"]
        if sharding is None:
            return
        self._per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunks))
        self._index_bytes = int(np.prod(self._per_shard)) * 16 + (4 if sharding["crc32c"] else 0)
        self._index_at_end = sharding["at_end"]
        self._indexes: OrderedDict = OrderedDict()
        self._index_lock = threading.Lock()

    def _set_decoder(self, endian: str | None, compressor: str | None) -> None:
        """Byte order and decoder of the fast path (bytes codec + at most Blosc or zstd)."""
        if endian is not None and self.dtype.itemsize > 1:
            self.byte_dtype = self.dtype.newbyteorder("<" if endian == "little" else ">")
        if compressor == "blosc":
            import numcodecs.blosc

            # Blosc's own thread team (used from the main thread by default) costs
            # ~0.5 ms per small chunk; we parallelise across chunks instead. Only
            # applied when the user has not chosen.
            if numcodecs.blosc.use_threads is None:
                numcodecs.blosc.use_threads = False
            self.decoder = numcodecs.blosc.Blosc().decode  # Blosc's header carries its settings
        elif compressor == "zstd":
            import numcodecs.zstd

            self.decoder = numcodecs.zstd.Zstd().decode

    @classmethod
    def from_local_json(cls, root: str, prefix: str) -> "_Level | None":
        """The level at ``root/prefix`` read from its ``zarr.json`` alone, without importing
        zarr (~16 MB of resident memory), when its layout is one the fast path decodes (plain
        regular chunks, bytes codec, at most Blosc or zstd); None otherwise."""
        import json

        try:
            with open(os.path.join(root, prefix, "zarr.json")) as f:
                meta = json.load(f)
            grid = meta["chunk_grid"]
            codecs = meta["codecs"]
            sharding = None
            if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
                config = codecs[0]["configuration"]
                index = config.get("index_codecs", [{"name": "bytes"}, {"name": "crc32c"}])
                index_names = [c["name"] for c in index]
                if index_names not in (["bytes"], ["bytes", "crc32c"]) or \
                        (index[0].get("configuration") or {}).get("endian", "little") != "little":
                    return None
                sharding = {"shards": tuple(int(c) for c in grid["configuration"]["chunk_shape"]),
                            "inner": tuple(int(c) for c in config["chunk_shape"]),
                            "crc32c": len(index_names) == 2,
                            "at_end": config.get("index_location", "end") == "end"}
                codecs = config["codecs"]
            names = [c["name"] for c in codecs]
            encoding = meta.get("chunk_key_encoding", {"name": "default"})
            if (meta.get("zarr_format") != 3 or meta.get("node_type") != "array"
                    or grid["name"] != "regular" or meta.get("storage_transformers")
                    or not names or names[0] != "bytes" or len(names) > 2
                    or any(n not in ("blosc", "zstd") for n in names[1:])
                    or encoding["name"] not in ("default", "v2")):
                return None
            dtype = np.dtype(meta["data_type"])  # plain names ("float32", "uint8", ...) only
            fill = meta.get("fill_value", 0)
            fill = dtype.type(float(fill) if isinstance(fill, str) else fill)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self = cls.__new__(cls)
        self.array = None
        self.shape = tuple(int(n) for n in meta["shape"])
        self.chunks = sharding["inner"] if sharding else \
            tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        self._init_sharding(sharding)
        self.dtype = dtype
        self.store_url = root
        self.fill_value = fill
        self.chunk_nbytes = int(np.prod(self.chunks)) * dtype.itemsize
        self.decoder = None
        self.byte_dtype = dtype
        self.fast = True
        self._set_decoder((codecs[0].get("configuration") or {}).get("endian"),
                          names[1] if len(names) == 2 else None)
        self.local_root = root
        self.prefix = prefix
        sep = (encoding.get("configuration") or {}).get("separator", "/" if encoding["name"] == "default" else ".")
        if encoding["name"] == "default":
            self._encode_key = lambda coords: sep.join(["c", *map(str, coords)])
        else:
            self._encode_key = lambda coords: sep.join(map(str, coords)) if coords else "0"
        return self

    def _store_key(self, coords: tuple[int, ...]) -> str:
        key = self._encode_key(coords)
        return f"{self.prefix}/{key}" if self.prefix else key

    def key(self, coords: tuple[int, ...]) -> str:
        """Store key of the chunk at grid ``coords`` (for an inner chunk of a shard: the
        shard's key and the chunk's position in it)."""
        if self.shard_shape is None:
            return self._store_key(coords)
        outer = tuple(c // n for c, n in zip(coords, self._per_shard))
        inner = tuple(c % n for c, n in zip(coords, self._per_shard))
        return f"{self._store_key(outer)}[chunk {','.join(map(str, inner))}]"

    def fetch_chunk(self, coords: tuple[int, ...]) -> tuple[bytes | None, bool]:
        """``(stored bytes of the chunk at grid coords, whether its file exists)``: ``(None,
        False)`` for a missing chunk file (or shard), ``(None, True)`` for an inner chunk its
        shard's index marks empty (it holds the fill value)."""
        if self.shard_shape is None:
            raw = self.fetch_raw(self._store_key(coords))
            return raw, raw is not None
        outer = tuple(c // n for c, n in zip(coords, self._per_shard))
        path = os.path.join(self.local_root, self._store_key(outer))
        try:
            with open(path, "rb") as f:
                index = self._shard_index(outer, f)
                offset, nbytes = index[tuple(c % n for c, n in zip(coords, self._per_shard))]
                if offset == _EMPTY and nbytes == _EMPTY:
                    return None, True
                f.seek(int(offset))
                return f.read(int(nbytes)), True
        except FileNotFoundError:
            return None, False

    def _shard_index(self, outer: tuple[int, ...], f) -> np.ndarray:
        """The (offset, nbytes) index of a shard, read once and kept (16 bytes a chunk)."""
        with self._index_lock:
            index = self._indexes.get(outer)
            if index is not None:
                self._indexes.move_to_end(outer)
                return index
        if self._index_at_end:
            f.seek(-self._index_bytes, os.SEEK_END)
        raw = f.read(self._index_bytes)
        if len(raw) != self._index_bytes:
            raise ValueError(f"shard index of {len(raw)} bytes, expected {self._index_bytes}")
        index = np.frombuffer(raw[:int(np.prod(self._per_shard)) * 16], dtype="<u8") \
            .reshape(self._per_shard + (2,))
        with self._index_lock:
            self._indexes[outer] = index
            if len(self._indexes) > _MAX_SHARD_INDEXES:
                self._indexes.popitem(last=False)
        return index

    def fetch_raw(self, key: str) -> bytes | None:
        if self.local_root is not None:
            try:
                with open(os.path.join(self.local_root, key), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buf = sync(self.array.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()


def _multiscales(attrs: dict) -> dict | None:
    """The first NGFF ``multiscales`` entry: under ``ome`` (NGFF 0.5) or top-level (0.4)."""
    entries = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    return entries[0] if entries else None


def _ngff_meta(attrs: dict, ndim: int) -> dict:
    """Axes, spatial axes, voxel size and a diagonal affine from NGFF metadata alone (stores
    written by other tools): level 0's scale and translation of the axes of type "space"."""
    multiscales = _multiscales(attrs)
    if not multiscales or len(multiscales.get("axes", [])) != ndim:
        return {}
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in multiscales["axes"]]
    kinds = [a.get("type") if isinstance(a, dict) else None for a in multiscales["axes"]]
    spatial = [i for i, kind in enumerate(kinds) if kind == "space"] or \
        list(range(max(0, ndim - 3), ndim))
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for transform in multiscales["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"]]
        elif transform.get("type") == "translation":
            translation = [float(v) for v in transform["translation"]]
    affine = np.eye(4)
    for row, ax in enumerate(spatial[-3:]):
        affine[row, row] = scale[ax]
        affine[row, 3] = translation[ax]
    time = [i for i, kind in enumerate(kinds) if kind == "time"]
    return {"axes": axes, "spatial_axes": spatial, "affine": affine.tolist(),
            "voxel_size": [scale[ax] for ax in spatial],
            "time_step_s": scale[time[0]] if time else None}


def _open_local_image(path) -> tuple[dict, list[_Level]] | None:
    """(attributes, levels) of a local OME-Zarr image group whose every level the fast path
    reads, from the JSON metadata alone (no zarr import); None when zarr must open it."""
    import json

    root = os.fspath(path)
    if "://" in root:
        return None
    try:
        with open(os.path.join(root, "zarr.json")) as f:
            group = json.load(f)
        if group.get("zarr_format") != 3 or group.get("node_type") != "group":
            return None
        attrs = group.get("attributes") or {}
        paths = [d["path"] for d in _multiscales(attrs)["datasets"]]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    levels = [_Level.from_local_json(root, p) for p in paths]
    return None if not levels or any(lv is None for lv in levels) else (attrs, levels)


class Volume:
    """A Zarr v3 / OME-Zarr volume read patch by patch.

    Args:
        path: a local path or any URL zarr opens (``s3://...`` needs fsspec), a ``zarr.Group``
            written by :func:`pybrain_mpi.data.convert` (or any NGFF image), or a ``zarr.Array``.
        cache_bytes: capacity of the decoded-chunk LRU cache (per Volume), or None (default)
            for automatic sizing: the cache grows to hold the chunks of ``cache_patches``
            patches of the largest size read so far (worst-case chunk alignment), capped by
            ``cache_budget_bytes`` and by the size of the whole level; see
            :func:`auto_cache_bytes`. E.g. float32 with 32^3 chunks: 64^3 patches -> 27
            chunks/patch -> 27 MiB for 8 patches; 128^3 -> 125 chunks -> 125 MiB. A fixed
            size for patches much larger than the cache thrashes (every patch re-reads its
            chunks). Re-use *across* random patches depends on the fraction of the volume
            cached: random 64^3 patches, 32^3 chunks, warm read amplification 0.03-0.08 on
            the 1 mm MNI152 T1 (the automatic 27 MiB holds all its chunks in 16 MiB: constant
            background chunks cost one element each), but about 2.9 on the same brain
            upsampled 2x (277 MiB: 10% cached). Pass ``cache_bytes`` (a good part of the
            volume) where re-use matters more than memory. The cache is charged what a chunk
            holds: a chunk whose every element is one value (air, empty labels) is kept as a
            one-element broadcast.
        cache_patches: patches' worth of chunks the automatic cache holds (default 8).
        cache_budget_bytes: upper bound of the automatic cache (default 512 MiB).
        threads: threads decoding the chunks of one patch in parallel (1 = in the caller).
        padding: what a patch reaching outside the volume gets: ``"error"`` raises
            :class:`PatchOutOfBounds`; ``"constant"`` fills the outside with ``pad_value``.
        pad_value: value used outside the volume with ``padding="constant"``.

    Attributes: ``shape``, ``dtype``, ``chunks``, ``affine`` (4x4, voxel of level 0 -> mm),
    ``voxel_size``, ``levels`` (shape per level), ``spatial_axes``, ``time_axis`` (0 for
    converted 4D fMRI, else None); counters ``bytes_read`` (decoded bytes of chunks fetched
    from the store), ``bytes_fetched`` (stored, compressed bytes), ``bytes_returned``,
    ``chunk_hits``, ``chunk_misses``.
    """

    def __init__(self, path, *, cache_bytes: int | None = None, threads: int = 2,
                 padding: str = "error", pad_value: float = 0,
                 cache_patches: int = AUTO_CACHE_PATCHES, cache_budget_bytes: int = AUTO_CACHE_BUDGET):
        if padding not in ("error", "constant"):
            raise ValueError(f"padding must be 'error' or 'constant', not {padding!r}")
        self.padding = padding
        self.pad_value = pad_value
        local = _open_local_image(path) if isinstance(path, (str, os.PathLike)) else None
        if local is not None:
            self.path = str(path)
            attrs, self._levels = local
        else:
            attrs = self._open_with_zarr(path)
        self._init_rest(attrs, cache_bytes, threads, cache_patches, cache_budget_bytes)

    def _open_with_zarr(self, path) -> dict:
        """Opens any store zarr opens (remote URLs, sharded or filtered arrays); sets the
        levels and returns the image's attributes."""
        import zarr

        if isinstance(path, (zarr.Array, zarr.Group)):
            node = path
            self.path = str(node.store_path)
        else:
            self.path = str(path)
            if "://" not in self.path and not os.path.exists(self.path):
                raise FileNotFoundError(f"no Zarr store at {self.path}; create one with "
                                        f"`pybrain-mpi convert IN {self.path}`")
            node = zarr.open(self.path, mode="r")
        attrs = dict(node.attrs)
        if isinstance(node, zarr.Group):
            multiscales = _multiscales(attrs)
            paths = [d["path"] for d in multiscales["datasets"]] if multiscales \
                else (["0"] if "0" in node else [])
            if not paths:
                raise FileNotFoundError(f"{self.path} is a Zarr group without OME multiscales "
                                        "metadata or an array '0'; open the array itself")
            arrays = [node[p] for p in paths]
        else:
            arrays = [node]
        self._levels = [_Level(a, self.path) for a in arrays]
        return attrs

    def _init_rest(self, attrs, cache_bytes, threads, cache_patches, cache_budget_bytes) -> None:
        meta = attrs.get(ATTRS_KEY) or _ngff_meta(attrs, len(self._levels[0].shape))
        self.strict_chunks = bool(meta.get("all_chunks_written", False))
        ndim = len(self._levels[0].shape)
        self.spatial_axes = tuple(meta.get("spatial_axes", range(max(0, ndim - 3), ndim)))
        self.axes = tuple(meta.get("axes", [f"dim{i}" for i in range(ndim)]))
        self.time_axis = self.axes.index("t") if "t" in self.axes else None
        self.affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
        self.voxel_size = tuple(meta.get("voxel_size", [1.0] * len(self.spatial_axes)))
        self.time_step_s = meta.get("time_step_s")
        self.auto_cache = cache_bytes is None
        self.cache_patches = max(1, int(cache_patches))
        self.cache_budget_bytes = int(cache_budget_bytes)
        self._sized_for: set = set()  # (level, patch size) pairs the automatic cache has seen
        if self.auto_cache:
            lv = self._levels[0]
            cache_bytes = min(AUTO_CACHE_FLOOR, self.cache_budget_bytes,
                              int(np.prod(lv.shape)) * lv.dtype.itemsize)
        self._cache = _ChunkCache(cache_bytes)
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pbm-decode") \
            if self.threads > 1 else None
        self._counter_lock = threading.Lock()
        self.reset_counters()

    # ---------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of level 0 in stored axis order."""
        return self._levels[0].shape

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        """Element dtype."""
        return self._levels[0].dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk shape of level 0."""
        return self._levels[0].chunks

    @property
    def levels(self) -> list[tuple[int, ...]]:
        """Shape of every resolution level, finest first."""
        return [lv.shape for lv in self._levels]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes of level 0."""
        return tuple(self.shape[a] for a in self.spatial_axes)

    @property
    def cache_used_bytes(self) -> int:
        """Bytes of decoded chunks held in the cache."""
        return self._cache.used_bytes

    @property
    def cache_capacity_bytes(self) -> int:
        """Current capacity of the chunk cache (grows with patch size when automatic)."""
        return self._cache.capacity_bytes

    def size_cache_for(self, size: Sequence[int], level: int = 0) -> int:
        """Grows the automatic cache for patches of ``size`` (done by :meth:`read_patch` on
        first sight of a size; call it ahead to size the cache before a benchmark's cold
        epoch). No effect on a fixed ``cache_bytes``. Returns the capacity."""
        key = (level, tuple(int(n) for n in size))
        if self.auto_cache and key not in self._sized_for:
            lv = self._levels[level]
            self._cache.grow(auto_cache_bytes(key[1], lv.chunks, lv.shape, lv.dtype.itemsize,
                                              patches=self.cache_patches, budget=self.cache_budget_bytes))
            self._sized_for.add(key)
        return self._cache.capacity_bytes

    @property
    def read_amplification(self) -> float:
        """Decoded bytes fetched from the store per byte returned (0 when nothing returned)."""
        return self.bytes_read / self.bytes_returned if self.bytes_returned else 0.0

    def reset_counters(self) -> None:
        """Zeroes the byte and chunk counters (the cache is kept)."""
        self.bytes_read = 0
        self.bytes_fetched = 0
        self.bytes_returned = 0
        self.chunk_hits = 0
        self.chunk_misses = 0

    def clear_cache(self) -> None:
        """Drops every cached chunk (a cold start for benchmarks)."""
        self._cache.clear()

    def close(self) -> None:
        """Stops the decode threads; the Volume must not be used afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"Volume({self.path!r}, shape={self.shape}, dtype={self.dtype}, chunks={self.chunks}, "
                f"levels={len(self._levels)})")

    # ---------------------------------------------------------------- chunks
    def _load_chunk(self, level: _Level, coords: tuple[int, ...]) -> np.ndarray:
        """Fetches and decodes one chunk (no cache)."""
        key = level.key(coords)
        if not level.fast:
            sl = tuple(slice(c * s, min((c + 1) * s, n))
                       for c, s, n in zip(coords, level.chunks, level.shape))
            try:
                block = np.asarray(level.array[sl])
            except Exception as err:
                raise ChunkError(f"chunk {key} of store {self.path} could not be read: {err}",
                                 self.path, key) from err
            with self._counter_lock:
                self.bytes_read += block.nbytes
                self.bytes_fetched += block.nbytes
            return block
        try:
            raw, exists = level.fetch_chunk(coords)
        except (OSError, ValueError) as err:
            raise ChunkError(f"chunk {key} of store {self.path} could not be read: {err}",
                             self.path, key) from err
        if raw is None:
            if self.strict_chunks and not exists:
                raise ChunkError(
                    f"chunk {key} is missing from store {self.path} although the store was "
                    "written with every chunk present; the copy is incomplete: copy it again "
                    "or re-run `pybrain-mpi convert`", self.path, key)
            # Zarr semantics: an absent chunk holds the fill value.
            # (a read-only broadcast: no chunk-sized memory in the cache).
            return np.broadcast_to(np.full((1,) * len(level.chunks), level.fill_value, dtype=level.dtype),
                                   level.chunks)
        try:
            count = int(np.prod(level.chunks))
            if level.decoder is not None:
                # Decoded straight into a fresh array: no intermediate bytes object (half the
                # decode time, one allocation per chunk instead of two).
                block = np.empty(count, dtype=level.byte_dtype)
                level.decoder(raw, out=block)
            else:
                block = np.frombuffer(raw, dtype=level.byte_dtype)
            if block.size != count:
                raise ValueError(f"decoded {block.size} elements, expected {count}")
            block = block.reshape(level.chunks)
            if block.dtype != level.dtype:
                block = block.astype(level.dtype)
            if len(raw) * 64 < block.nbytes:  # compressed this well: maybe one repeated value
                block = _constant_view(block)
        except Exception as err:
            raise ChunkError(
                f"chunk {key} of store {self.path} is corrupt ({type(err).__name__}: {err}); "
                "re-run `pybrain-mpi convert` or restore the file", self.path, key) from err
        with self._counter_lock:
            self.bytes_read += block.nbytes
            self.bytes_fetched += len(raw)
        return block

    def _chunk(self, level_index: int, coords: tuple[int, ...]) -> np.ndarray:
        """One decoded chunk, through the cache."""
        key = (level_index, coords)
        state, item = self._cache.get_or_claim(key)
        if state == "hit":
            with self._counter_lock:
                self.chunk_hits += 1
            return item
        if state == "wait":
            with self._counter_lock:
                self.chunk_hits += 1
            return item.result()
        try:
            block = self._load_chunk(self._levels[level_index], coords)
        except BaseException as err:
            self._cache.fulfil(key, None, err)
            raise
        with self._counter_lock:
            self.chunk_misses += 1
        self._cache.fulfil(key, block)
        return block

    def _cached_chunk(self, level_index: int, coords: tuple[int, ...]) -> np.ndarray | None:
        """The chunk if cached (counted as a hit), else None."""
        block = self._cache.peek((level_index, coords))
        if block is not None:
            with self._counter_lock:
                self.chunk_hits += 1
        return block

    def chunk_key(self, coords: Sequence[int], level: int = 0) -> str:
        """The store key of the chunk at chunk-grid ``coords`` (for messages and tools)."""
        return self._levels[level].key(tuple(int(c) for c in coords))

    # ---------------------------------------------------------------- patches
    def read_patch(self, start: Sequence[int], size: Sequence[int], level: int = 0,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Returns the patch ``[start, start + size)`` of ``level`` as a new array (or in ``out``).

        Only the chunks the patch intersects are read. Outside the volume: see ``padding``.
        """
        if not 0 <= level < len(self._levels):
            raise IndexError(f"{self.path} has {len(self._levels)} level(s); level {level} requested")
        lv = self._levels[level]
        start = tuple(int(s) for s in start)
        size = tuple(int(n) for n in size)
        if len(start) != len(lv.shape) or len(size) != len(lv.shape):
            raise ValueError(f"start {start} and size {size} must have {len(lv.shape)} entries for "
                             f"{self.path} of shape {lv.shape} (axes {self.axes})")
        if any(n <= 0 for n in size):
            raise ValueError(f"patch size {size} must be positive")
        inside = all(s >= 0 and s + n <= d for s, n, d in zip(start, size, lv.shape))
        if not inside and self.padding == "error":
            raise PatchOutOfBounds(
                f"patch start={start} size={size} reaches outside {self.path} (level {level}, shape "
                f"{lv.shape}); move it inside or open the Volume with padding='constant'")
        if self.auto_cache and (level, size) not in self._sized_for:
            self.size_cache_for(size, level)
        if out is None:
            out = np.empty(size, dtype=lv.dtype)
        elif out.shape != size:
            raise ValueError(f"out has shape {out.shape}, patch size is {size}")
        if not inside:
            out[...] = self.pad_value
        # Per axis: (chunk index, slice inside the chunk, slice inside the patch).
        axis_parts = []
        for ax, (s, n, d, c) in enumerate(zip(start, size, lv.shape, lv.chunks)):
            lo, hi = max(0, s), min(d, s + n)
            if hi <= lo:
                return out  # entirely outside the volume
            parts = []
            for ci in range(lo // c, (hi - 1) // c + 1):
                c0 = ci * c
                a, b = max(lo, c0), min(hi, c0 + c)
                parts.append((ci, slice(a - c0, b - c0), slice(a - s, b - s)))
            axis_parts.append(parts)
        pieces = [(tuple(p[0] for p in combo), tuple(p[1] for p in combo), tuple(p[2] for p in combo))
                  for combo in itertools.product(*axis_parts)]
        # Cached chunks are copied at once; only misses go to the decode threads (a pool
        # round trip costs more than copying a cached chunk).
        missing = []
        for coords, src, dst in pieces:
            block = self._cached_chunk(level, coords)
            if block is None:
                missing.append((coords, src, dst))
            else:
                out[dst] = block[src]
        if self._pool is not None and len(missing) > 1:
            futures = [self._pool.submit(self._chunk, level, coords) for coords, _, _ in missing]
            for i, (coords, src, dst) in enumerate(missing):
                out[dst] = futures[i].result()[src]
                # Drop the reference at once: a chunk the cache evicted (or never admitted) is
                # freed now, not when the whole patch is done (up to 125 chunks at 128^3).
                futures[i] = None
        else:
            for coords, src, dst in missing:
                out[dst] = self._chunk(level, coords)[src]
        with self._counter_lock:
            self.bytes_returned += out.nbytes
        return out

    def read(self, level: int = 0) -> np.ndarray:
        """The whole level as one array (small volumes, tests)."""
        return self.read_patch((0,) * len(self._levels[level].shape), self._levels[level].shape, level)
