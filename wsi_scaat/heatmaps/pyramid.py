"""Storage side of stitching: patch-map reads by store chunk (with a per-process cache), block-wise zarr
writes, the pyramid levels (2x2 means), the scheduler, the multiscales metadata.

Every task opens the zarr arrays it reads or writes by path, so the same graph runs on dask's local
threads and on a ``dask.distributed`` cluster (workers sharing the file system). Writes are aligned
to the output chunks, so no two tasks ever write the same chunk.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

MAX_SIDE = 512  # the pyramid stops at the first level whose longer side is <= MAX_SIDE
LOCAL_SCHEDULERS = ("threads", "synchronous", "sync", "processes")
CACHE_BYTES = 128 << 20  # decoded ``maps`` chunks kept per process while stitching


def read_patches(maps: zarr.Array, idx: np.ndarray) -> np.ndarray:
    """Maps of the sorted patch indices ``idx``: one slice of ``idx[0] .. idx[-1]`` when at least half of
    it is used, else a zarr orthogonal selection (each touched store chunk read once)."""
    if len(idx) == 0:
        return np.zeros((0, *maps.shape[1:]), dtype=maps.dtype)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if hi - lo <= 2 * len(idx):
        block = maps[lo:hi]
        return block if hi - lo == len(idx) else block[idx - lo]
    return maps.oindex[idx]


class ChunkCache:
    """Decoded store chunks shared by a process's tasks, least recently used evicted past ``max_bytes``.

    Horizontally adjacent blocks read the same store chunks (a chunk holds 64 patches of a grid row);
    keys carry a per-run token, so a rewritten store is never served stale.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple[str, int], value: np.ndarray) -> None:
        with self._lock:
            if key in self._data:
                return
            self._data[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes and self._data:
                self._bytes -= self._data.popitem(last=False)[1].nbytes

    def drop(self, token: str) -> None:
        """Forget the chunks of one run (keys ``token`` and ``token/<anything>``)."""
        with self._lock:
            for key in [k for k in self._data if k[0] == token or k[0].startswith(f"{token}/")]:
                self._bytes -= self._data.pop(key).nbytes


CACHE = ChunkCache(CACHE_BYTES)


def read_patches_cached(maps: zarr.Array, idx: np.ndarray, token: str) -> np.ndarray:
    """Like :func:`read_patches`, through :data:`CACHE`: the missing store chunks are read in one call."""
    n, total = maps.chunks[0], maps.shape[0]
    cidx = idx // n
    chunks = np.unique(cidx).tolist()
    got = {c: CACHE.get((token, c)) for c in chunks}
    missing = [c for c in chunks if got[c] is None]
    if missing:
        data = read_patches(maps, np.concatenate([np.arange(c * n, min(c * n + n, total)) for c in missing]))
        pos = 0
        for c in missing:
            size = min(c * n + n, total) - c * n
            got[c] = data[pos : pos + size].copy()  # a copy, so evicting it frees it
            CACHE.put((token, c), got[c])
            pos += size
    out = np.empty((len(idx), *maps.shape[1:]), dtype=maps.dtype)
    bounds = np.searchsorted(cidx, chunks + [chunks[-1] + 1] if chunks else [])
    for c, a, b in zip(chunks, bounds[:-1], bounds[1:], strict=False):
        out[a:b] = got[c][idx[a:b] - c * n]
    return out


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def level_shapes(height: int, width: int, max_side: int = MAX_SIDE) -> list[tuple[int, int]]:
    """Shapes of levels 0, 1, ...: each ceil(half) of the previous, down to longer side <= ``max_side``."""
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > max_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def coarsen2(block: np.ndarray) -> np.ndarray:
    """Mean of 2x2 pixel blocks; an odd last row/column is edge-padded (mean of the pixels present)."""
    a = np.asarray(block, dtype=np.float32)
    if a.shape[0] % 2:
        a = np.concatenate([a, a[-1:]], axis=0)
    if a.shape[1] % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    return ((a[0::2, 0::2] + a[1::2, 0::2]) + (a[0::2, 1::2] + a[1::2, 1::2])) * np.float32(0.25)


def _write_block(block: np.ndarray, path: str, block_info: dict | None = None) -> np.ndarray:
    """Write one block at its place in the zarr array at ``path``; returns a 1x1 token."""
    if block_info is None:
        raise ValueError("dask passes block_info to map_blocks functions that take it")
    (r0, r1), (c0, c1) = block_info[0]["array-location"]
    zarr.open_array(path, mode="r+")[r0:r1, c0:c1] = block
    return np.zeros((1, 1), dtype=np.int8)


def store_lazily(arr: da.Array, path: str | Path) -> da.Array:
    """A lazy array whose computation writes ``arr`` block by block into the zarr array at ``path``."""
    return arr.map_blocks(_write_block, str(path), dtype=np.int8,
                          chunks=tuple((1,) * len(c) for c in arr.chunks))  # fmt: skip


@contextlib.contextmanager
def _scheduler_kwargs(scheduler: str | None) -> Iterator[dict[str, Any]]:
    if scheduler is None or scheduler in LOCAL_SCHEDULERS:
        name = scheduler or "threads"
        local = name not in ("synchronous", "sync")
        yield {"scheduler": name} | ({"num_workers": available_cores()} if local else {})
        return
    from dask.distributed import Client

    with Client(scheduler, set_as_default=False) as client:
        yield {"scheduler": client}


def compute(arrays: list[da.Array], scheduler: str | None, progress: bool) -> None:
    """Compute ``arrays`` (writes) on dask's local threads (None) or the cluster at address ``scheduler``."""
    with _scheduler_kwargs(scheduler) as kwargs:
        client = kwargs["scheduler"]
        if progress and not isinstance(client, str):
            from dask.distributed import progress as dist_progress

            futures = client.compute(arrays)
            dist_progress(futures, notebook=False, scheduler=client.scheduler.address)
            client.gather(futures)
            return
        bar: contextlib.AbstractContextManager = contextlib.nullcontext()
        if progress:
            from dask.diagnostics import ProgressBar

            bar = ProgressBar()
        with bar:
            dask.compute(*arrays, **kwargs)


def build_levels(group: Path, shapes: list[tuple[int, int]], chunk: int, scheduler: str | None,
                 progress: bool) -> None:  # fmt: skip
    """Fill levels 1.. of ``group`` from level 0: each level read back lazily, coarsened 2x2, written."""
    for k in range(1, len(shapes)):
        prev = da.from_zarr(str(group / str(k - 1)), chunks=(2 * chunk, 2 * chunk))
        half = tuple(tuple((n + 1) // 2 for n in c) for c in prev.chunks)
        level = prev.map_blocks(coarsen2, dtype=np.float32, chunks=half)
        assert level.shape == shapes[k], (level.shape, shapes[k])
        compute([store_lazily(level, group / str(k))], scheduler, progress)


def create_levels(root: zarr.Group, shapes: list[tuple[int, int]], chunk: int) -> None:
    """Create the empty float32 arrays "0", "1", ... chunked (chunk, chunk), fill value 0."""
    for k, shape in enumerate(shapes):
        root.create_array(str(k), shape=shape, dtype="float32", chunks=(chunk, chunk), fill_value=0.0,
                          dimension_names=("y", "x"))  # fmt: skip


def multiscales(n_levels: int, pixel_um: float, name: str) -> list[dict[str, Any]]:
    """OME-NGFF (0.4) style ``multiscales`` metadata: axes y, x in micrometres, one scale per level."""
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale",
                 "scale": [pixel_um * 2**k, pixel_um * 2**k]}]} for k in range(n_levels)]  # fmt: skip
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    return [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets, "type": "mean",
             "metadata": {"method": "2x2 mean, odd edges padded by replication"}}]  # fmt: skip
