"""Intervals for the evaluation tables: a bootstrap over held-out slides and training seeds.

Patches of one slide (or one image) are correlated, so the unit resampled is the slide, never the
patch alone: each replicate draws the held-out slides with replacement (the same draw for the two
runs of a paired comparison, which keeps their patches paired) and, independently for each run, its
training seeds with replacement. A statistic is computed from per-slide aggregates: ``(sum, count)``
of a per-patch metric, or histograms for a pooled AUROC, so one replicate is a matrix product.

The point estimate is the mean over seeds of the statistic on all slides; the interval is the 2.5th
to 97.5th percentile of the replicates (percentile bootstrap). With few seeds (3) the seed part of
the interval is rough; the slide part dominates with many slides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps aggregates (..., F) to a statistic (...)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% bootstrap interval (NaN when undefined)."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0."""
        return bool(self.low > 0 or self.high < 0)


def mean_statistic(agg: np.ndarray) -> np.ndarray:
    """Mean of a per-patch metric from ``(sum, count)`` aggregates (NaN where the count is 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return agg[..., 0] / agg[..., 1]


def auroc_statistic(agg: np.ndarray) -> np.ndarray:
    """AUROC from ``[positive histogram, negative histogram]`` aggregates (..., 2 * bins): ties within a
    bin count one half (NaN when a class is empty)."""
    bins = agg.shape[-1] // 2
    pos, neg = agg[..., :bins], agg[..., bins:]
    below = np.cumsum(neg, -1) - neg
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(-1) / (n_pos * n_neg)


def patch_aggregates(slide_index: np.ndarray, values: np.ndarray, n_slides: int) -> np.ndarray:
    """(n_slides, 2) ``(sum, count)`` of the finite ``values`` per slide (``slide_index`` in 0..n-1)."""
    ok = np.isfinite(values)
    sums = np.bincount(slide_index[ok], weights=values[ok], minlength=n_slides)
    counts = np.bincount(slide_index[ok], minlength=n_slides).astype(np.float64)
    return np.stack([sums, counts], 1)


def histogram_aggregates(
    slide_index: np.ndarray, scores: np.ndarray, positive: np.ndarray, n_slides: int, bins: int = 1024
) -> np.ndarray:
    """(n_slides, 2 * bins) histograms of ``scores`` in [0, 1] of the positives, then the negatives."""
    b = np.clip(np.floor(np.asarray(scores, np.float64) * bins), 0, bins - 1).astype(np.int64)
    positive = np.asarray(positive, bool)
    out = np.zeros((n_slides, 2 * bins))
    np.add.at(out, (slide_index, b + np.where(positive, 0, bins)), 1.0)
    return out


def _replicates(
    aggs: Sequence[np.ndarray], stat: Statistic, weights: np.ndarray, picks: np.ndarray
) -> np.ndarray:
    """(B,) mean over the picked seeds of each replicate's statistic."""
    per_seed = np.stack([stat(weights @ a) for a in aggs])  # (seeds, B)
    return per_seed[picks, np.arange(len(weights))[:, None]].mean(1)


def _point(aggs: Sequence[np.ndarray], stat: Statistic) -> float:
    return float(np.mean([stat(a.sum(0)) for a in aggs]))


def bootstrap(
    runs: Sequence[np.ndarray],
    stat: Statistic,
    reference: Sequence[np.ndarray] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> Interval:
    """Mean over seeds of ``stat`` with its 95% interval, or, given ``reference``, the paired difference.

    ``runs`` and ``reference`` hold one (n_slides, F) aggregate array per training seed, over the same
    slides in the same order. Replicates with an undefined statistic (a draw without lesion, say) are
    left out of the percentiles.
    """
    if not runs or (reference is not None and not reference):
        raise ValueError("every run needs at least one seed")
    n_slides = runs[0].shape[0]
    if any(a.shape[0] != n_slides for a in [*runs, *(reference or [])]):
        raise ValueError("aggregates over different numbers of slides cannot be paired")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_slides, np.full(n_slides, 1.0 / n_slides), size=n_boot).astype(np.float64)
    reps = _replicates(runs, stat, weights, rng.integers(len(runs), size=(n_boot, len(runs))))
    point = _point(runs, stat)
    if reference is not None:
        picks = rng.integers(len(reference), size=(n_boot, len(reference)))
        reps = reps - _replicates(reference, stat, weights, picks)
        point -= _point(reference, stat)
    reps = reps[np.isfinite(reps)]
    if not len(reps) or not np.isfinite(point):
        return Interval(point, float("nan"), float("nan"))
    low, high = np.percentile(reps, [2.5, 97.5])
    return Interval(point, float(low), float(high))
