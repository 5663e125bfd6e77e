"""Slide-level localisation: AUROC of a stitched heatmap against the lesion mask, inside the tissue.

Out of core: the heatmap's level 0 is read one zarr chunk at a time; each chunk's tissue pixels add
to two histograms of heatmap values (lesion, non-lesion) over ``BINS`` equal bins of [0, 1] (heatmaps
are normalised to that range). The AUROC is then the Mann-Whitney statistic of the histograms, ties
within a bin counted one half: exact for values that differ by more than 1 / ``BINS``, and the
pooled AUROC of several slides is the same statistic of the summed histograms.

Every heatmap value (``stitch.value``: saliency, evidence, weighted, probability) is also measured
without stitching it, on :func:`wsi_scaat.heatmaps.bounded.value_map` (the value blended from the
saliency store into one in-memory map of at most ``EVAL_MAX_SIDE`` pixels a side; exactly the
stitched level 0 when that fits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_scaat.errors import StoreError
from wsi_scaat.evaluation.groundtruth import LesionRegion
from wsi_scaat.heatmaps import values
from wsi_scaat.heatmaps.bounded import value_map
from wsi_scaat.heatmaps.stitching import tissue_pixels

BINS = 1 << 16
EVAL_MAX_SIDE = 2048  # longer side of the in-memory map of each value (64 MB of float64 buffers)


def heatmap_histograms(
    heatmap: str | Path, saliency_store: str | Path, region: LesionRegion, bins: int = BINS
) -> tuple[np.ndarray, np.ndarray]:
    """(lesion, non-lesion) histograms (int64, ``bins``) of level-0 heatmap values on tissue pixels.

    Tissue is the tiling's tissue mask carried by the saliency store; without one, every pixel of the
    slide counts.
    """
    try:
        root = zarr.open_group(str(heatmap), mode="r")
        level0, hd = root["0"], float(root.attrs["heatmap_downsample"])
        sal = zarr.open_group(str(saliency_store), mode="r")
        mask = np.asarray(sal["tissue_mask"][...]) if "tissue_mask" in sal else None
        td = float(sal.attrs.get("tissue_downsample", 1.0))
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise StoreError(heatmap, f"cannot read heatmap level 0 and tissue mask: {exc!r}") from exc
    pos = np.zeros(bins, dtype=np.int64)
    neg = np.zeros(bins, dtype=np.int64)
    (h, w), (ch, cw) = level0.shape, level0.chunks
    for r0 in range(0, h, ch):
        for c0 in range(0, w, cw):
            box = (r0, min(r0 + ch, h), c0, min(c0 + cw, w))
            values = np.asarray(level0[box[0] : box[1], box[2] : box[3]], dtype=np.float64)
            keep = tissue_pixels(mask, td, hd, box) if mask is not None else np.ones(values.shape, bool)
            lesion = region.grid_mask((box[0], box[1]), (box[2], box[3]), hd)
            idx = np.clip(np.floor(np.nan_to_num(values) * bins), 0, bins - 1).astype(np.int64)
            pos += np.bincount(idx[keep & lesion], minlength=bins)
            neg += np.bincount(idx[keep & ~lesion], minlength=bins)
    return pos, neg


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC of scores whose positives and negatives fall in the bins as ``pos`` / ``neg`` (NaN if one
    class is empty): P(score_pos > score_neg) + P(same bin) / 2."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def value_histograms(saliency_store: str | Path, region: LesionRegion, value: str, bins: int = BINS,
                     **settings: Any) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(lesion, non-lesion) histograms of :func:`value_map` on its tissue pixels (all pixels without a
    tissue mask); ``settings``: the options of :func:`value_map`."""
    vm = value_map(saliency_store, value, **({"max_side": EVAL_MAX_SIDE} | settings))
    pos = np.zeros(bins, dtype=np.int64)
    neg = np.zeros(bins, dtype=np.int64)
    h, w = vm.values.shape
    for r0 in range(0, h, 256):
        r1 = min(r0 + 256, h)
        keep = vm.tissue[r0:r1] if vm.tissue is not None else np.ones((r1 - r0, w), bool)
        lesion = region.grid_mask((r0, r1), (0, w), vm.pixel)
        idx = np.clip(np.floor(vm.values[r0:r1].astype(np.float64) * bins), 0, bins - 1).astype(np.int64)
        pos += np.bincount(idx[keep & lesion], minlength=bins)
        neg += np.bincount(idx[keep & ~lesion], minlength=bins)
    return pos, neg


def value_aurocs(
    slides: Iterable[Any], regions: dict[str, LesionRegion], stitch: Any
) -> dict[str, float | None]:
    """Pooled slide heatmap AUROC of every heatmap value over the ``slides`` (each with ``slide_id`` and
    ``saliency``, its store) whose lesion region in ``regions`` is not empty, with the stitch settings
    ``stitch`` (a ``StitchConfig``); None where undefined (no lesion, or no non-lesion tissue)."""
    settings = {"window": stitch.window, "low_percentile": stitch.low_percentile,
                "high_percentile": stitch.high_percentile, "mask_tissue": stitch.mask_tissue}  # fmt: skip
    pairs = [(s.saliency, regions[s.slide_id]) for s in slides if not regions[s.slide_id].empty]
    out: dict[str, float | None] = {}
    for value in values.VALUES:
        pos, neg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
        for path, region in pairs:
            p, n = value_histograms(path, region, value, **settings)
            pos += p
            neg += n
        auc = auroc_from_histograms(pos, neg)
        out[value] = auc if math.isfinite(auc) else None
    return out
