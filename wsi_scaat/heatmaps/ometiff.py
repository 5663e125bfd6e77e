"""Pyramidal OME-TIFF of a heatmap that lines up with its slide pixel for pixel.

Level 0 of the OME-TIFF has the slide's level-0 size divided by ``ome_downsample`` (1 by
default: the slide's own size) and ``PhysicalSizeX/Y = mpp_level0 * ome_downsample`` µm, so
QuPath, napari and tiatoolbox overlay it on the slide. Lower levels halve the size (rounded up)
until the longer side is <= ``OME_MIN_SIDE``; they are stored as SubIFDs of level 0 (the OME-TIFF
pyramid layout).

Resampling is nearest neighbour: OME pixel ``(r, c)`` of a level with downsample ``d`` takes the
value of the heatmap pixel that covers its centre ``((c + 0.5) d, (r + 0.5) d)`` in level-0
pixels, read from the deepest heatmap pyramid level that is not coarser than ``d``. Values are
exact (``round(255 v)``, never interpolated), heatmap pixels stay visible as blocks at full zoom,
and the heatmap's own 2x2-mean pyramid does the anti-aliasing at low zoom. Tiles are produced one
tile row at a time from a band of heatmap rows, so neither the heatmap nor the OME-TIFF level is
ever held whole in memory.

Compression is Deflate (``zlib``, TIFF compression 8) with horizontal differencing (predictor 2):
libtiff (OpenSlide), tifffile (tiatoolbox, napari) and Bio-Formats (QuPath) all decode it.

Both files are RGB: the grey heatmap has ``R = G = B = round(255 v)``. tiatoolbox's TIFF reader
takes only images with a sample or channel axis (``YXS``, ``CYX``; a one-channel image reads as
``YX`` and is refused), and a second channel would not do: it reads two samples as grey and alpha,
composited over white. OpenSlide opens either file as a generic TIFF with level 0 only: it does
not see SubIFDs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_scaat.atomic import atomic_output

#: Add pyramid levels until the longer side is at most this.
OME_MIN_SIDE = 512
#: Largest band of heatmap rows (bytes) cached while a level is written.
BAND_BYTES = 32 * 1024**2
#: Files whose uncompressed level 0 exceeds this are written as BigTIFF.
BIGTIFF_BYTES = 2**31


def to_uint8(values: np.ndarray) -> np.ndarray:
    """``round(255 v)`` of heatmap values, clipped to [0, 1]; NaN becomes 0."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    return np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)


#: The grey heatmap's lookup table: R = G = B = the uint8 value.
GREY_LUT = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)


def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.rint(cmap(np.arange(256) / 255.0)[:, :3] * 255.0).astype(np.uint8)


def source_level(downsample: float, heatmap_downsample: float, n_levels: int) -> int:
    """Deepest heatmap level whose level-0 downsample (``hd * 2**k``) is not coarser than ``downsample``."""
    k = 0
    while k + 1 < n_levels and heatmap_downsample * 2 ** (k + 1) <= downsample * (1 + 1e-9):
        k += 1
    return k


def ome_levels(width: int, height: int, ome_downsample: float = 1.0) -> list[tuple[int, int, float]]:
    """``(width, height, downsample)`` of each OME level; downsample relative to slide level 0."""
    levels = []
    d = float(ome_downsample)
    while True:
        w, h = max(1, math.ceil(width / d)), max(1, math.ceil(height / d))
        levels.append((w, h, d))
        if max(w, h) <= OME_MIN_SIDE:
            return levels
        d *= 2


def nearest_index(n_out: int, downsample: float, src_downsample: float, n_src: int) -> np.ndarray:
    """Source index covering the centre of each of ``n_out`` output pixels (clipped to the source)."""
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * downsample
    return np.clip(np.floor(centres / src_downsample).astype(np.int64), 0, n_src - 1)


class _RowBand:
    """Reads row windows of a 2-D (zarr) array, caching chunk-aligned bands within ``BAND_BYTES``."""

    def __init__(self, array: Any) -> None:
        self.array = array
        rows, cols = array.shape
        chunk_rows = int(getattr(array, "chunks", (rows, cols))[0])
        fits = chunk_rows * cols * np.dtype(array.dtype).itemsize <= BAND_BYTES
        self.align = chunk_rows if fits else 1
        self.start, self.data = 0, np.empty((0, cols), np.float32)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0 .. r1 - 1`` (float32)."""
        if not (self.start <= r0 and r1 <= self.start + len(self.data)):
            b0 = (r0 // self.align) * self.align
            b1 = min(self.array.shape[0], -(-r1 // self.align) * self.align)
            self.start, self.data = b0, np.asarray(self.array[b0:b1], dtype=np.float32)
        return self.data[r0 - self.start : r1 - self.start]


def _level_tiles(
    levels: Sequence[Any],
    heatmap_downsample: float,
    size: tuple[int, int, float],
    tile: int,
    lut: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Row-major uint8 tiles (RGB through ``lut``) of one OME level; edge tiles smaller (tifffile pads).

    Per tile row only the heatmap rows it needs are read (and coloured); each tile is then a
    nearest-neighbour gather from them, so memory does not grow with the slide's size.
    """
    w, h, d = size
    k = source_level(d, heatmap_downsample, len(levels))
    src = levels[k]
    sd = heatmap_downsample * 2**k
    cols = nearest_index(w, d, sd, src.shape[1])
    rows = nearest_index(h, d, sd, src.shape[0])
    band = _RowBand(src)
    for r0 in range(0, h, tile):
        ridx = rows[r0 : r0 + tile]
        lo = int(ridx[0])
        block = to_uint8(band.rows(lo, int(ridx[-1]) + 1))
        if lut is not None:  # colour the few source pixels, then resample
            block = lut[block]
        for c0 in range(0, w, tile):
            cidx = cols[c0 : c0 + tile]
            c_lo = int(cidx[0])
            sub = np.take(block[:, c_lo : int(cidx[-1]) + 1], ridx - lo, axis=0)
            yield np.take(sub, cidx - c_lo, axis=1)


def write_heatmap_ome_tiff(
    final: Path,
    levels: Sequence[Any],
    heatmap_downsample: float,
    slide_size: tuple[int, int],
    mpp: float,
    *,
    lut: np.ndarray | None = None,
    tile_size: int = 512,
    ome_downsample: float = 1.0,
    name: str = "heatmap",
    compression: str = "zlib",
    maxworkers: int = 1,
) -> Path:
    """Write ``final`` atomically from heatmap pyramid ``levels`` (2-D arrays, values in [0, 1]).

    ``slide_size`` is the slide's level-0 ``(width, height)``, ``mpp`` its level-0 µm per pixel.
    RGB uint8 through ``lut`` (see :func:`colormap_lut`); without one, grey: R = G = B =
    ``round(255 v)``, channel name ``saliency``. ``maxworkers`` threads compress tiles.
    """
    import tifffile

    if tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16, got {tile_size}")
    sizes = ome_levels(slide_size[0], slide_size[1], ome_downsample)
    w0, h0, _ = sizes[0]
    px_um = mpp * ome_downsample
    metadata = {
        "axes": "YXS",
        "Name": name,
        "PhysicalSizeX": px_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": px_um,
        "PhysicalSizeYUnit": "µm",
    }
    if lut is None:
        lut = GREY_LUT
        metadata["Channel"] = {"Name": ["saliency"]}
    bigtiff = w0 * h0 * 3 > BIGTIFF_BYTES
    with atomic_output(final) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tif:
        for j, size in enumerate(sizes):
            w, h, d = size
            res = 1e4 / (mpp * d)  # pixels per cm
            tif.write(
                _level_tiles(levels, heatmap_downsample, size, tile_size, lut),
                shape=(h, w, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(tile_size, tile_size),
                compression=compression,
                predictor=True,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subifds=len(sizes) - 1 if j == 0 else None,
                subfiletype=1 if j else 0,
                metadata=metadata if j == 0 else None,
                maxworkers=maxworkers,
                buffersize=BAND_BYTES // 4,
            )
    return Path(final)
