"""A heatmap value blended from the saliency store into one in-memory map of bounded size.

:func:`value_map` gives the heatmap of any ``stitch.value`` without stitching a pyramid: on a grid of
at most ``max_side`` pixels a side, ``f = ceil(longer heatmap side / max_side)`` heatmap pixels wide
(``f = 1``: exactly the stitched level 0 of that value, same float64 sums in the same order), with
the stitcher's window, normalisation and tissue mask. For ``f > 1`` each patch's values and weights
are first summed over ``q x q`` blocks (``q`` the largest divisor of the map side not above ``f``),
and a coarse pixel holds ``sum w m / sum w`` over the blocks whose centre falls in it. Memory: two
float64 buffers of the grid and one batch of patch maps. Used by the evaluation (slide AUROC of every
value) and by the export (the display scale of the saliency factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_scaat.heatmaps import values
from wsi_scaat.heatmaps.stitching import _finish, _window64, open_plan, slide_range, tissue_pixels

VALUE_BATCH = 1 << 20  # map values per batch while blending


@dataclass(frozen=True)
class ValueMap:
    """A heatmap value on a bounded grid: values (float32, as stitched), pixel side, tissue pixels."""

    values: np.ndarray
    pixel: float  # level-0 px
    tissue: np.ndarray | None


def _pool(a: np.ndarray, q: int) -> np.ndarray:
    """Sums over (q, q) blocks of the last two axes (q divides them)."""
    if q == 1:
        return a
    n, m = a.shape[0], a.shape[-1]
    return a.reshape(n, m // q, q, m // q, q).sum((2, 4))


def value_map(saliency_store: str | Path, value: str, *, window: str = "hann", low_percentile: float = 1.0,
              high_percentile: float = 99.0, mask_tissue: bool = True, max_side: int = 2048,
              norm: tuple[float, float] | None = None) -> ValueMap:  # fmt: skip
    """The slide's heatmap of ``value`` on a grid of at most ``max_side`` px a side, normalised and
    masked like the stitched heatmap (``norm``: the raw values mapped to 0 and 1 instead of the
    percentiles); ``tissue`` is the store's tissue mask on that grid, if any."""
    plan = open_plan(saliency_store, True, value)
    if norm is None:
        norm = slide_range(plan, low_percentile, high_percentile)
    (h, w), m = plan.shape, plan.map_size
    f = max(1, math.ceil(max(h, w) / max_side))
    q = max(d for d in range(1, min(f, m) + 1) if m % d == 0)
    shape = (-(-h // f), -(-w // f))
    num = np.zeros(shape[0] * shape[1], np.float64)
    den = np.zeros_like(num)
    win = _window64(m, window)
    wsum = _pool(win[None], q)[0]
    centre = np.arange(0, m, q) + (q - 1) / 2  # block centres in heatmap pixels from the patch's corner
    batch = max(1, VALUE_BATCH // (m * m))
    for src in plan.sources:
        for s in range(0, src.n, batch):
            raw = None if src.array is None else np.asarray(src.array[s : s + batch])
            prob = None if src.prob is None else src.prob[s : s + batch]
            pix = values.pixel_values(value, raw, prob, m)
            pix *= win
            sel = slice(src.offset + s, src.offset + s + len(pix))
            r = plan.rows[sel][:, None, None] + centre[None, :, None]  # heatmap rows of the block centres
            c = plan.cols[sel][:, None, None] + centre[None, None, :]
            r, c = np.broadcast_arrays(r, c)
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)  # as the stitcher: nothing beyond the slide
            flat = (np.floor(r[inside] / f) * shape[1] + np.floor(c[inside] / f)).astype(np.int64)
            np.add.at(num, flat, _pool(pix, q)[inside])  # in patch order, one add at a time: as stitched
            np.add.at(den, flat, np.broadcast_to(wsum, inside.shape)[inside])
    tissue = None
    if plan.tissue_mask is not None:
        box = (0, shape[0], 0, shape[1])
        tissue = tissue_pixels(plan.tissue_mask, plan.tissue_downsample, plan.hd * f, box)
    vals = _finish(num.reshape(shape), den.reshape(shape), norm, tissue if mask_tissue else None)
    return ValueMap(vals, plan.hd * f, tissue)
