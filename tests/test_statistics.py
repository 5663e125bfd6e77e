"""The evaluation's intervals: a bootstrap over held-out slides and seeds, checked against a direct
loop, with exact answers where the statistics are degenerate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_scaat.evaluation.statistics import (
    auroc_statistic,
    bootstrap,
    histogram_aggregates,
    mean_statistic,
    patch_aggregates,
)
from wsi_scaat.metrics import auroc


def _per_slide(values: list[np.ndarray]) -> np.ndarray:
    """(sum, count) aggregates of per-slide value arrays."""
    idx = np.concatenate([np.full(len(v), k) for k, v in enumerate(values)])
    return patch_aggregates(idx, np.concatenate(values), len(values))


def test_patch_aggregates_skip_missing_values() -> None:
    agg = patch_aggregates(np.array([0, 0, 1, 2, 2]), np.array([1.0, np.nan, 2.0, 3.0, 5.0]), 4)
    np.testing.assert_array_equal(agg, [[1, 1], [2, 1], [8, 2], [0, 0]])
    assert np.isnan(mean_statistic(agg)[3]) and mean_statistic(agg)[2] == 4.0


def test_constant_shift_gives_an_exact_difference() -> None:
    rng = np.random.default_rng(0)
    slides = [rng.random(rng.integers(5, 30)) for _ in range(12)]
    ref = [_per_slide(slides), _per_slide([v * 0.5 for v in slides])]
    run = [_per_slide([v + 0.1 for v in slides]), _per_slide([v * 0.5 + 0.1 for v in slides])]
    diff = bootstrap(run, mean_statistic, ref, n_boot=500, seed=1)
    # the seeds are drawn independently for the two runs: only draws of the same seeds give exactly 0.1
    assert diff.estimate == pytest.approx(0.1)
    same = bootstrap([run[0]], mean_statistic, [ref[0]], n_boot=500, seed=1)  # one seed each: paired
    assert (same.estimate, same.low, same.high) == pytest.approx((0.1, 0.1, 0.1))
    assert same.excludes_zero


def test_slides_are_resampled_not_patches() -> None:
    """Two slides of constant values: any patch-level bootstrap would give a point interval around the
    pooled mean; resampling slides spans from one slide's value to the other's."""
    agg = _per_slide([np.zeros(50), np.ones(50)])
    iv = bootstrap([agg], mean_statistic, n_boot=2000, seed=0)
    assert iv.estimate == 0.5 and iv.low == 0.0 and iv.high == 1.0


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 15), st.integers(1, 4), st.integers(1, 4))
def test_vectorised_bootstrap_equals_a_direct_loop(seed: int, n_slides: int, k_run: int, k_ref: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 20, n_slides)
    run = [_per_slide([rng.random(n) for n in sizes]) for _ in range(k_run)]
    ref = [_per_slide([rng.random(n) for n in sizes]) for _ in range(k_ref)]
    n_boot = 200
    got = bootstrap(run, mean_statistic, ref, n_boot=n_boot, seed=seed)
    # the same draws, one replicate at a time
    draw = np.random.default_rng(seed)
    weights = draw.multinomial(n_slides, np.full(n_slides, 1 / n_slides), size=n_boot)
    run_picks = draw.integers(k_run, size=(n_boot, k_run))
    ref_picks = draw.integers(k_ref, size=(n_boot, k_ref))
    reps = []
    for b in range(n_boot):

        def mean_of(models, picks, b=b):
            vals = []
            for j in picks:
                agg = (models[j] * weights[b][:, None]).sum(0)
                vals.append(agg[0] / agg[1])
            return np.mean(vals)

        reps.append(mean_of(run, run_picks[b]) - mean_of(ref, ref_picks[b]))
    low, high = np.percentile(reps, [2.5, 97.5])
    point = np.mean([a.sum(0)[0] / a.sum(0)[1] for a in run]) - np.mean(
        [a.sum(0)[0] / a.sum(0)[1] for a in ref]
    )
    assert (got.estimate, got.low, got.high) == pytest.approx((point, low, high), rel=1e-9, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_histogram_auroc_statistic_equals_rank_auroc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, bins = 300, 64
    scores = rng.integers(0, bins, n) / bins  # bin edges: exact
    labels = rng.random(n) < 0.3
    slide = rng.integers(0, 5, n)
    agg = histogram_aggregates(slide, scores, labels, 5, bins)
    assert agg.sum() == n and agg[:, :bins].sum() == labels.sum()
    expected = auroc(scores, labels)
    assert auroc_statistic(agg.sum(0)) == pytest.approx(expected, abs=1e-12)
    iv = bootstrap([agg], auroc_statistic, n_boot=200, seed=seed)
    assert iv.estimate == pytest.approx(expected) and iv.low <= iv.estimate <= iv.high
