"""Strip-wise writing of pyramidal tiled JPEG TIFFs that OpenSlide opens (one IFD per level).

Level 0 is streamed to :mod:`tifffile` tile row by tile row from a painter function; the lower
levels are accumulated as raw files in a temporary folder next to the output, so the slide is
never held in memory.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

MIN_LEVEL_SIDE = 512  # add pyramid levels until the longer side is <= this


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded) of an (h, w, 3) uint8 image; odd sizes are edge-padded."""
    if a.shape[0] % 2 or a.shape[1] % 2:
        a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
    s = a[0::2, 0::2].astype(np.uint16)
    s += a[1::2, 0::2]
    s += a[0::2, 1::2]
    s += a[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def _tiles(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of a strip (its height a multiple of tile, or the slide's last rows)."""
    h, w = strip.shape[:2]
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            t = strip[ty : ty + tile, tx : tx + tile]
            if t.shape[0] < tile or t.shape[1] < tile:  # edge-pad: no black JPEG ringing
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), "edge")
            yield t


def _prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Run an iterator in a background thread, ``depth`` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # re-raised in the consumer
            put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def level_dims(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level: halve (ceil) until the longer side <= 512."""
    dims = [(width, height)]
    while max(dims[-1]) > MIN_LEVEL_SIDE:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def write_pyramid(
    path: Path,
    width: int,
    height: int,
    paint: Callable[[int, int], np.ndarray],
    *,
    mpp: float,
    tile: int = 256,
    quality: int = 85,
    subsampling: tuple[int, int] | None = None,
) -> None:
    """Write a tiled JPEG pyramidal TIFF (one IFD per level) painted strip by strip.

    ``subsampling``: JPEG chroma subsampling (None: tifffile's 2 x 2; (1, 1): none). Written to a
    temporary folder next to ``path`` and moved into place atomically.
    """
    dims = level_dims(width, height)
    strip_h = tile * -(-(2 ** (len(dims) - 1)) // tile)  # divisible by every downsample
    opts = dict(
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        resolutionunit="CENTIMETER",
        metadata=None,
        software=False,
        maxworkers=max(1, min(4, os.cpu_count() or 1)),
        buffersize=32 << 20,
    )
    if subsampling is not None:
        opts["subsampling"] = tuple(subsampling)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        raw = [tmp / f"level{k}.raw" for k in range(len(dims))]
        files = [open(f, "wb") for f in raw[1:]]  # noqa: SIM115 - closed below

        def strips() -> Iterator[np.ndarray]:
            for y0 in range(0, height, strip_h):
                strip = low = paint(y0, min(strip_h, height - y0))
                for f in files:  # downsample before yielding: tifffile stops at the last tile
                    low = _halve(low)
                    f.write(low.tobytes())
                yield strip

        def level0() -> Iterator[np.ndarray]:
            for strip in _prefetch(strips()):
                yield from _tiles(strip, tile)

        def from_file(k: int) -> Iterator[np.ndarray]:
            w, h = dims[k]
            with open(raw[k], "rb") as f:
                for y0 in range(0, h, tile):
                    rows = min(tile, h - y0)
                    yield from _tiles(np.fromfile(f, np.uint8, rows * w * 3).reshape(rows, w, 3), tile)

        out = tmp / "slide.tiff"
        try:
            with tifffile.TiffWriter(out, bigtiff=width * height * 3 > 2**31) as tw:
                for k, (w, h) in enumerate(dims):
                    tiles = level0() if k == 0 else from_file(k)
                    res = 1e4 / (mpp * 2**k)
                    try:
                        tw.write(
                            tiles,
                            shape=(h, w, 3),
                            dtype=np.uint8,
                            resolution=(res, res),
                            subfiletype=0 if k == 0 else 1,
                            **opts,
                        )
                    finally:
                        tiles.close()  # stops and joins the painting thread
                    if k == 0:
                        for f in files:
                            f.close()
        finally:
            for f in files:
                f.close()
        os.replace(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
