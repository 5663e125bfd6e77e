"""Interpretability metrics: exact numbers on hand-made maps, properties, and cross-checks with Quantus.

The Quantus cross-checks (skipped without quantus) run its metrics with their defaults on the same random
inputs. Where the definitions cannot be aligned they are not compared: pointing game on an empty mask
(Quantus reports a hit), rank accuracy with ties (Quantus uses argsort order), ROAD and pixel flipping
on multi-channel inputs (Quantus's ROAD fails for C > 1; its pixel flipping ranks channel values
separately), and deletion AUCs (Quantus's ``np.trapz`` is gone in numpy 2; its curves are compared).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from wsi_scaat.metrics import (
    auroc,
    auroc_localisation,
    complexity_entropy,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    noisy_linear_imputation,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road,
    road_auc,
    sparseness_gini,
)
from wsi_scaat.metrics.faithfulness import _impute_cg, _impute_spsolve

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = 1e-6


class MeanProb(nn.Module):
    """Two classes; the probability of class 1 is the mean of the input (clamped to [EPS, 1 - EPS])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.double().mean((1, 2, 3)).clamp(EPS, 1 - EPS)
        return torch.stack([torch.log1p(-m), torch.log(m)], 1)


def small_cnn(channels: int = 1, classes: int = 3, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes),
        )  # fmt: skip
    return net.eval()


def maps(draw_shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(draw_shape).astype(np.float32)


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
map_batches = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(2, 6)).flatmap(
    lambda s: arrays(np.float32, s, elements=finite)
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quantus():
    q = pytest.importorskip("quantus")
    warnings.filterwarnings("ignore", module="quantus")
    return q


# ---------------------------------------------------------------------------------------------------
# Complexity


def test_gini_exact() -> None:
    n = 16
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 2, 1] = -3.0  # |attr| is used
    assert sparseness_gini(one_hot).item() == pytest.approx(1 - 1 / n)
    assert sparseness_gini(torch.full((2, 4, 4), 0.7)).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert sparseness_gini(torch.zeros(1, 4, 4)).item() == 0.0
    # sorted 0, 0, 1, 1: (1 * 1 + 3 * 1) / (4 * 2)
    assert sparseness_gini(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])).item() == pytest.approx(0.5)


def test_entropy_exact() -> None:
    one_hot = torch.zeros(1, 3, 3)
    one_hot[0, 0, 0] = 2.0
    assert complexity_entropy(one_hot).item() == 0.0
    assert complexity_entropy(torch.ones(1, 3, 3)).item() == pytest.approx(math.log(9))
    assert complexity_entropy(torch.tensor([[[1.0, -1.0, 2.0, 0.0]]])).item() == pytest.approx(
        1.5 * math.log(2)
    )
    assert math.isnan(complexity_entropy(torch.zeros(1, 2, 2)).item())


def test_complexity_channels_are_features_and_numpy_accepted() -> None:
    a = maps((3, 2, 5, 4), 0)
    flat = torch.from_numpy(a).reshape(3, 10, 4)
    for fn in (sparseness_gini, complexity_entropy):
        assert torch.allclose(fn(a), fn(flat))
        assert fn(a).shape == (3,) and fn(a).dtype == torch.float64


@PROPS
@given(map_batches, st.floats(0.01, 100), st.randoms(use_true_random=False))
def test_complexity_properties(a: np.ndarray, scale: float, rnd) -> None:
    t = torch.from_numpy(a)
    n = t[0].numel()
    g, h = sparseness_gini(t), complexity_entropy(t)
    nonzero = t.reshape(len(t), -1).abs().sum(1) > 0
    assert ((g >= -1e-9) & (g <= 1 - 1 / n + 1e-9)).all()
    assert ((h[nonzero] >= -1e-9) & (h[nonzero] <= math.log(n) + 1e-9)).all()
    assert torch.isnan(h[~nonzero]).all()
    perm = list(range(n))
    rnd.shuffle(perm)
    shuffled = t.reshape(len(t), -1)[:, perm].reshape(t.shape)
    for fn, v in ((sparseness_gini, g), (complexity_entropy, h)):
        for other in (fn(-scale * t), fn(shuffled)):
            assert torch.allclose(other, v, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("shape", [(16, 1, 12, 12), (8, 3, 8, 8)])
def test_complexity_matches_quantus(quantus, shape: tuple[int, ...]) -> None:
    a = maps(shape, 1)
    x = np.random.default_rng(2).random(shape).astype(np.float32)
    y = np.zeros(shape[0], dtype=np.int64)
    kw = {"model": None, "x_batch": x, "y_batch": y, "a_batch": a.copy(), "channel_first": True}
    q_gini = np.array(quantus.Sparseness(disable_warnings=True)(**kw), dtype=np.float64)
    kw["a_batch"] = a.copy()
    q_ent = np.array(quantus.Complexity(disable_warnings=True)(**kw), dtype=np.float64)
    np.testing.assert_allclose(sparseness_gini(a).numpy(), q_gini, rtol=0, atol=1e-5)
    np.testing.assert_allclose(complexity_entropy(a).numpy(), q_ent, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Localisation


def test_localisation_exact() -> None:
    attr = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]]).repeat(3, 1, 1)
    mask = torch.zeros(3, 3, 3, dtype=torch.bool)
    mask[0, 2, 2] = True  # the maximum: hit
    mask[1, 0, :] = True  # top row: miss
    # mask 2 empty
    pg = pointing_game(attr, mask)
    assert pg[:2].tolist() == [1.0, 0.0] and math.isnan(pg[2].item())
    rma = relevance_mass_accuracy(attr, mask)
    assert rma[:2].tolist() == pytest.approx([8 / 36, 3 / 36]) and math.isnan(rma[2].item())
    rra = relevance_rank_accuracy(attr, mask)  # K = 1: top-1 is pixel 8; K = 3: top-3 are 6, 7, 8
    assert rra[:2].tolist() == [1.0, 0.0] and math.isnan(rra[2].item())
    auc = auroc_localisation(attr, mask)
    assert auc[:2].tolist() == pytest.approx([1.0, 0.0]) and math.isnan(auc[2].item())
    assert math.isnan(auroc_localisation(attr[:1], torch.ones(1, 3, 3)).item())


def test_localisation_ties() -> None:
    attr = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    mask = torch.tensor([[[1, 0], [0, 0]]])
    assert pointing_game(attr, mask).item() == 1.0  # any maximal pixel in the mask is a hit
    # K = 1, three values tied at the top, one inside: expected hits 1/3
    assert relevance_rank_accuracy(attr, mask).item() == pytest.approx(1 / 3)
    mask2 = torch.tensor([[[1, 1], [0, 0]]])  # K = 2: two of the three tied slots, two tied inside
    assert relevance_rank_accuracy(attr, mask2).item() == pytest.approx(2 / 3)
    # positives {1, 1}, negatives {1, 0}: pairs won 0.5, 1, 0.5, 1 -> 3 / 4
    assert auroc_localisation(attr, mask2).item() == pytest.approx(0.75)


def test_localisation_channels_broadcast_mask() -> None:
    a = torch.from_numpy(maps((4, 2, 5, 5), 3))
    m = torch.from_numpy(np.random.default_rng(4).random((4, 5, 5)) > 0.5)
    stacked = a.reshape(4, 10, 5)
    m2 = m.repeat(1, 2, 1)
    for fn in (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy, auroc_localisation):
        assert torch.allclose(fn(a, m), fn(stacked, m2), equal_nan=True)
    with pytest.raises(ValueError):
        pointing_game(a, m[:, :4])


@PROPS
@given(map_batches, st.data())
def test_localisation_properties(a: np.ndarray, data) -> None:
    t = torch.from_numpy(a)
    m = torch.from_numpy(data.draw(arrays(np.bool_, a.shape)))
    has = m.reshape(len(m), -1).any(1)
    pg = pointing_game(t, m)
    assert torch.isnan(pg[~has]).all() and set(pg[has].tolist()) <= {0.0, 1.0}
    rra = relevance_rank_accuracy(t, m)
    assert torch.isnan(rra[~has]).all() and ((rra[has] >= 0) & (rra[has] <= 1 + 1e-12)).all()
    auc = auroc_localisation(t, m)
    # the project's scipy AUROC (midranks), sample by sample
    ref = [auroc(a[i].ravel(), m[i].numpy().ravel()) for i in range(len(a))]
    np.testing.assert_allclose(auc.numpy(), ref, atol=1e-12)
    # reversing the scores mirrors the AUROC; a monotone transform keeps it
    assert torch.allclose(auroc_localisation(-t, m), 1 - auc, atol=1e-12, equal_nan=True)
    assert torch.allclose(auroc_localisation(torch.atan(t), m), auc, atol=1e-12, equal_nan=True)
    # the mask of the K largest values is all hits (K = mask size), unless the K-th value is tied
    top = torch.zeros_like(m).reshape(len(m), -1)
    clear = torch.zeros(len(m), dtype=torch.bool)
    for i, k in enumerate(m.reshape(len(m), -1).sum(1).tolist()):
        desc = t[i].ravel().sort(descending=True).values
        top[i, torch.argsort(-t[i].double().ravel(), stable=True)[:k]] = True
        clear[i] = k > 0 and (k == len(desc) or bool(desc[k - 1] > desc[k]))
    top_rra = relevance_rank_accuracy(t, top.reshape(m.shape))
    assert torch.allclose(top_rra[clear], torch.ones_like(top_rra[clear]))
    # the mass inside a mask and inside its complement add up to 1
    a_pos = t.abs() + 1
    both = relevance_mass_accuracy(a_pos, m) + relevance_mass_accuracy(a_pos, ~m)
    full = has & (~m).reshape(len(m), -1).any(1)
    assert torch.allclose(both[full], torch.ones_like(both[full]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_localisation_matches_quantus(quantus, seed: int) -> None:
    rng = np.random.default_rng(seed)
    b, h, w = 12, 10, 9
    a = rng.standard_normal((b, 1, h, w)).astype(np.float32)
    density = rng.uniform(0.05, 0.95, (b, 1, 1, 1))
    s = (rng.random((b, 1, h, w)) < density).astype(np.float32)
    s[0] = 1.0  # full mask: AUC NaN
    s[1, 0, 0, 0] = 0.0
    s[1, 0, 4, 5] = 1.0  # single pixel
    x = rng.random((b, 1, h, w)).astype(np.float32)
    y = np.zeros(b, dtype=np.int64)
    ours = {
        "PointingGame": pointing_game(a[:, 0], s[:, 0]),
        "RelevanceMassAccuracy": relevance_mass_accuracy(a[:, 0], s[:, 0]),
        "RelevanceRankAccuracy": relevance_rank_accuracy(a[:, 0], s[:, 0]),
        "AUC": auroc_localisation(a[:, 0], s[:, 0]),
    }
    for name, mine in ours.items():
        metric = getattr(quantus, name)(disable_warnings=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = metric(
                model=None, x_batch=x, y_batch=y, a_batch=a.copy(), s_batch=s.copy(), channel_first=True
            )
        q = np.array(q, dtype=np.float64)
        np.testing.assert_allclose(mine.numpy(), q, rtol=1e-5, atol=1e-6, err_msg=name)


def test_quantus_pointing_game_empty_mask_differs(quantus) -> None:
    """Documented difference: Quantus reports a hit for an empty mask, we report NaN."""
    a = maps((2, 1, 4, 4), 5)
    s = np.zeros((2, 1, 4, 4), np.float32)
    s[1, 0, 1, 1] = 1
    q = quantus.PointingGame(disable_warnings=True)(
        model=None, x_batch=np.ones_like(a), y_batch=np.zeros(2, np.int64), a_batch=a, s_batch=s,
        channel_first=True,
    )  # fmt: skip
    assert bool(q[0]) is True
    assert math.isnan(pointing_game(a[:, 0], s[:, 0])[0].item())


# ---------------------------------------------------------------------------------------------------
# Deletion / insertion


def ramp(b: int = 1) -> torch.Tensor:
    """(b, 1, 4, 4) images with pixel values 1..16 / 16."""
    return (torch.arange(1, 17, dtype=torch.float32) / 16).reshape(1, 1, 4, 4).repeat(b, 1, 1, 1)


def test_deletion_insertion_exact() -> None:
    x, one = ramp(), torch.ones(1, dtype=torch.long)
    attr = x[:, 0]  # MoRF removes the brightest four pixels per step
    curve = deletion_curve(MeanProb(), x, attr, one, steps=4, baseline=0.0)
    expected = np.array([136, 78, 36, 10, 0]) / 256
    np.testing.assert_allclose(curve[0].numpy(), np.maximum(expected, EPS), atol=1e-7)
    area = float(np.trapezoid(expected, dx=0.25))
    assert deletion_auc(MeanProb(), x, attr, one, steps=4, baseline=0.0).item() == pytest.approx(
        area, abs=1e-6
    )
    ins = insertion_curve(MeanProb(), x, attr, one, steps=4, baseline=0.0)
    expected_ins = np.array([0, 58, 100, 126, 136]) / 256
    np.testing.assert_allclose(ins[0].numpy(), np.maximum(expected_ins, EPS), atol=1e-7)
    assert insertion_auc(MeanProb(), x, attr, one, steps=4, baseline=0.0).item() == pytest.approx(
        float(np.trapezoid(expected_ins, dx=0.25)), abs=1e-6
    )
    # the reversed order deletes the faint pixels first: a higher deletion AUC
    assert deletion_auc(MeanProb(), x, -attr, one, steps=4, baseline=0.0).item() > area
    # "mean" baseline (8.5 / 16): the brightest half replaced, then everything
    assert deletion_curve(MeanProb(), x, attr, one, steps=2, baseline="mean")[0].tolist() == pytest.approx(
        [136 / 256, (36 + 8 * 8.5) / 256, 136 / 256], abs=1e-6
    )
    white = deletion_curve(MeanProb(), x, attr, one, steps=1, baseline="white")
    assert white[0, -1].item() == pytest.approx(1 - EPS)


def test_deletion_coarse_map_removes_blocks() -> None:
    x, one = ramp(), torch.ones(1, dtype=torch.long)
    attr = torch.tensor([[[0.0, 1.0], [3.0, 2.0]]])  # cells: bottom-left, bottom-right, top-right, top-left
    curve = deletion_curve(MeanProb(), x, attr, one, steps=4, baseline=0.0)
    # block sums of 1..16 (4 x 4, 2 x 2 blocks): TL 1+2+5+6=14, TR 22, BL 46, BR 54
    remaining = np.array([136, 136 - 46, 136 - 46 - 54, 14, 0]) / 256
    np.testing.assert_allclose(curve[0].numpy(), np.maximum(remaining, EPS), atol=1e-7)


def test_deletion_batching_channels_modes_numpy() -> None:
    rng = np.random.default_rng(0)
    net = small_cnn(channels=3)
    net.train()
    x = rng.random((7, 3, 8, 8)).astype(np.float32)
    a = rng.standard_normal((7, 3, 8, 8)).astype(np.float32)
    t = rng.integers(0, 3, 7)
    full = deletion_auc(net, x, a, t, steps=8, batch_size=64)
    chunked = deletion_auc(net, torch.from_numpy(x), torch.from_numpy(a).sum(1), torch.from_numpy(t), steps=8,
                           batch_size=3)  # fmt: skip
    assert torch.allclose(full, chunked, atol=1e-7)
    assert net.training and all(m.training for m in net.modules())
    ins = insertion_auc(net, x, a, t, steps=8)
    assert (
        full.shape == ins.shape == (7,)
        and ((full >= 0) & (full <= 1)).all()
        and ((ins >= 0) & (ins <= 1)).all()
    )
    # end points: the intact image and the full baseline
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    with torch.no_grad():
        p_x = net.eval()(xt).double().softmax(1).gather(1, tt[:, None])[:, 0]
        p_0 = net(torch.zeros_like(xt)).double().softmax(1).gather(1, tt[:, None])[:, 0]
    d, i = (
        deletion_curve(net, x, a, t, steps=4, baseline=0.0),
        insertion_curve(net, x, a, t, steps=4, baseline=0.0),
    )
    assert torch.allclose(d[:, 0], p_x) and torch.allclose(d[:, -1], p_0)
    assert torch.allclose(i[:, 0], p_0) and torch.allclose(i[:, -1], p_x)
    with pytest.raises(ValueError):
        deletion_auc(net, x, a[:3], t, steps=8)


def test_deletion_curve_matches_quantus_pixel_flipping(quantus) -> None:
    rng = np.random.default_rng(3)
    b, h, w, steps = 10, 8, 8, 8
    net = small_cnn(channels=1)
    x = rng.random((b, 1, h, w)).astype(np.float32)
    a = rng.standard_normal((b, 1, h, w)).astype(np.float32)
    y = rng.integers(0, 3, b)
    metric = quantus.PixelFlipping(
        features_in_step=h * w // steps, perturb_baseline=0.0, disable_warnings=True
    )
    q = np.array(metric(model=net, x_batch=x, y_batch=y, a_batch=a.copy(), channel_first=True, softmax=True))
    ours = deletion_curve(net, x, a, y, steps=steps, baseline=0.0)
    np.testing.assert_allclose(ours[:, 1:].numpy(), q, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Noisy linear imputation and ROAD


def test_imputation_single_pixel_is_neighbour_mean() -> None:
    x = torch.from_numpy(maps((1, 2, 5, 5), 6)).double()
    removed = torch.zeros(1, 5, 5, dtype=torch.bool)
    removed[0, 2, 3] = True
    removed[0, 0, 0] = True  # corner: weights renormalised over its 3 neighbours
    out = noisy_linear_imputation(x, removed, noise=0.0)
    n = x[0, :, 1:4, 2:5]
    w = torch.tensor([[1, 2, 1], [2, 0, 2], [1, 2, 1]], dtype=torch.float64) / 12
    assert torch.allclose(out[0, :, 2, 3], (n * w).sum((1, 2)))
    corner = (2 * x[0, :, 0, 1] + 2 * x[0, :, 1, 0] + x[0, :, 1, 1]) / 5
    assert torch.allclose(out[0, :, 0, 0], corner)
    keep = ~removed[0]
    assert torch.equal(out[0][:, keep], x[0][:, keep])


def test_imputation_constant_and_noise_seeding() -> None:
    x = torch.full((3, 3, 6, 6), 0.25)
    removed = torch.from_numpy(np.random.default_rng(0).random((3, 6, 6)) < 0.7)
    assert torch.allclose(noisy_linear_imputation(x, removed, noise=0.0), x)
    a = noisy_linear_imputation(x, removed, noise=0.1, seeds=[1, 2, 3])
    b = noisy_linear_imputation(x[1:], removed[1:], noise=0.1, seeds=[2, 3])
    assert torch.equal(a[1:], b)
    assert not torch.equal(a, noisy_linear_imputation(x, removed, noise=0.1, seeds=[4, 5, 6]))
    assert torch.equal(a[:, :, ~removed[0]][0], x[0][:, ~removed[0]])
    with pytest.raises(ValueError):
        noisy_linear_imputation(x[:1], torch.ones(1, 6, 6, dtype=torch.bool))


def test_imputation_cg_matches_spsolve() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((3, 2, 20, 17)))
    yy, xx = np.mgrid[:20, :17]
    removed = np.stack(
        [rng.random((20, 17)) < 0.5, (yy - 9) ** 2 + (xx - 8) ** 2 < 40, rng.random((20, 17)) < 0.95]
    )
    rem = torch.from_numpy(removed)
    sp = noisy_linear_imputation(x, rem, noise=0.0, solver="spsolve")
    cg = noisy_linear_imputation(x, rem, noise=0.0, solver="cg")
    assert torch.allclose(sp, cg, atol=1e-4)
    assert torch.allclose(cg, _impute_cg(x, rem[:, None]), atol=0)


def test_imputation_matches_quantus(quantus) -> None:
    from quantus.functions.perturb_func import noisy_linear_imputation as q_impute

    rng = np.random.default_rng(2)
    for c, h, w, p in [(1, 8, 8, 0.3), (3, 12, 10, 0.6), (3, 16, 16, 0.9)]:
        img = rng.random((c, h, w))
        removed = rng.random((h, w)) < p
        q = q_impute(img.copy(), np.flatnonzero(removed), noise=0.0)
        np.testing.assert_allclose(_impute_spsolve(img, removed), q, rtol=0, atol=1e-10)


def test_road_exact_and_orders() -> None:
    one = torch.ones(2, dtype=torch.long)
    const = torch.full((2, 3, 6, 6), 0.4)
    attr = torch.from_numpy(maps((2, 6, 6), 7))
    curve = road(MeanProb(), const, attr, one, percentages=(0.0, 0.5, 0.9), noise=0.0)
    assert curve.shape == (2, 3) and torch.allclose(curve, torch.full_like(curve, 0.4))
    # one bright pixel: MoRF removes it first (imputed from zeros: all dark), LeRF keeps it and
    # imputes the removed dark pixels partly from it
    x = torch.zeros(2, 1, 6, 6)
    x[:, 0, 2, 2] = 1.0
    a = x[:, 0] + 0.01 * attr.abs()
    morf = road(MeanProb(), x, a, one, percentages=(0.1, 0.5), noise=0.0, order="morf")
    lerf = road(MeanProb(), x, a, one, percentages=(0.1, 0.5), noise=0.0, order="lerf")
    assert (
        torch.allclose(morf, torch.full_like(morf, EPS), rtol=0, atol=1e-12)
        and (lerf >= 1 / 36 - 1e-12).all()
    )
    auc_m = road_auc(MeanProb(), x, a, one, percentages=(0.1, 0.5), noise=0.0)
    assert torch.allclose(auc_m, morf.mean(1))  # two points: the trapezoid is their mean
    assert (road_auc(MeanProb(), x, a, one, percentages=(0.1, 0.5), noise=0.0, order="lerf") > auc_m).all()


def test_road_seeding_batching_scores() -> None:
    rng = np.random.default_rng(4)
    net = small_cnn(channels=3)
    x = torch.from_numpy(rng.random((5, 3, 8, 8)).astype(np.float32))
    a = torch.from_numpy(rng.standard_normal((5, 4, 4)))  # coarse map: 2 x 2 pixel cells
    t = torch.from_numpy(rng.integers(0, 3, 5))
    r1 = road(net, x, a, t, noise=0.05, seed=3, batch_size=2)
    r2 = road(net, x, a, t, noise=0.05, seed=3, batch_size=64)
    assert r1.shape == (5, 9) and torch.allclose(r1, r2, atol=1e-12)
    assert not torch.allclose(r1, road(net, x, a, t, noise=0.05, seed=4))
    correct = road(net, x, a, t, noise=0.05, seed=3, score="correct")
    assert set(correct.unique().tolist()) <= {0.0, 1.0}
    cg = road(net, x, a, t, noise=0.05, seed=3, solver="cg")
    assert torch.allclose(r1, cg, atol=1e-4)
    with pytest.raises(ValueError):
        road(net, x, a, t, percentages=(0.5, 1.0))
    with pytest.raises(ValueError):
        road(net, x, a, t, order="random")  # type: ignore[arg-type]


def test_road_matches_quantus(quantus) -> None:
    rng = np.random.default_rng(5)
    b, h, w = 24, 10, 10
    net = small_cnn(channels=1, classes=2, seed=1)
    x = rng.random((b, 1, h, w)).astype(np.float32)
    a = rng.standard_normal((b, 1, h, w)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    y[::3] = 1 - y[::3]  # some start wrong
    percents = [10, 30, 50, 70, 90]
    metric = quantus.ROAD(percentages=percents, noise=0.0, disable_warnings=True)
    q = metric(model=net, x_batch=x, y_batch=y, a_batch=a.copy(), channel_first=True)
    ours = road(net, x, a, y, percentages=[p / 100 for p in percents], noise=0.0, score="correct")
    np.testing.assert_allclose(ours.mean(0).numpy(), [q[p] for p in percents], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Localisation over valid (tissue) pixels


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_localisation_over_valid_pixels_equals_the_metric_on_those_pixels(seed: int) -> None:
    """Leaving pixels out through ``valid`` equals computing the metric on the valid pixels alone."""
    rng = np.random.default_rng(seed)
    h, w = 6, 7
    a = np.round(rng.random((h, w)) * 8) / 8  # ties included
    m = rng.random((h, w)) < 0.4
    v = rng.random((h, w)) < 0.7
    v[0, 0] = True
    got = {
        fn.__name__: float(fn(a[None], m[None], v[None])[0])
        for fn in (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy, auroc_localisation)
    }
    # the valid pixels as a 1 x n "map", metric without valid
    sub_a, sub_m = a[v][None, None, :], (m & v)[v][None, None, :]
    for fn in (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy, auroc_localisation):
        expected = float(fn(sub_a, sub_m)[0])
        assert (math.isnan(got[fn.__name__]) and math.isnan(expected)) or got[fn.__name__] == pytest.approx(
            expected, abs=1e-12
        ), fn.__name__


def test_localisation_valid_exact() -> None:
    a = torch.tensor([[[5.0, 1.0], [2.0, 3.0]]])
    lesion = torch.tensor([[[0, 1], [1, 0]]])
    glass = torch.tensor([[[0, 1], [1, 1]]])  # the top-left pixel (the maximum) is glass
    assert pointing_game(a, lesion).item() == 0.0 and pointing_game(a, lesion, glass).item() == 0.0
    assert relevance_mass_accuracy(a, lesion, glass).item() == pytest.approx(3 / 6)
    # valid pixels: 1 (lesion), 2 (lesion), 3 (not): AUROC = P(lesion > non-lesion) = 0
    assert auroc_localisation(a, lesion, glass).item() == 0.0
    assert relevance_rank_accuracy(a, lesion, glass).item() == pytest.approx(0.5)  # top 2: 3, 2


# ---------------------------------------------------------------------------------------------------
# Grid artefacts


def test_parity_and_nyquist_exact() -> None:
    from wsi_scaat.metrics.aliasing import nyquist_energy, parity_balance, parity_ratios, pool2, pool2_mask

    striped = torch.zeros(1, 4, 4)
    striped[:, 0::2] = 1.0  # mass on even rows only
    flat = torch.ones(1, 4, 4)
    assert parity_ratios(striped)[0].tolist() == [0.0, 1.0] and parity_balance(striped).item() == 0.0
    assert parity_balance(flat).item() == 1.0
    assert nyquist_energy(striped).item() == pytest.approx(1.0)  # all its variation is the alternation
    ramp = torch.arange(16.0).reshape(1, 4, 4)
    odd_rows, even_rows = (4 + 5 + 6 + 7) + (12 + 13 + 14 + 15), (0 + 1 + 2 + 3) + (8 + 9 + 10 + 11)
    odd_cols, even_cols = (1 + 5 + 9 + 13) + (3 + 7 + 11 + 15), (0 + 4 + 8 + 12) + (2 + 6 + 10 + 14)
    assert parity_ratios(ramp)[0].tolist() == pytest.approx([odd_rows / even_rows, odd_cols / even_cols])
    assert nyquist_energy(ramp).item() < 0.2
    pooled = pool2(striped)
    assert pooled.shape == (1, 2, 2) and torch.equal(pooled, torch.full((1, 2, 2), 0.5, dtype=torch.float64))
    from wsi_scaat.metrics import sparseness_gini

    assert (
        sparseness_gini(striped).item() > 0.4 and sparseness_gini(pooled).item() == 0.0
    )  # the artefact goes
    mask = torch.tensor([[[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]])
    assert pool2_mask(mask).tolist() == [[[False, True], [True, False]]]
    assert pool2_mask(mask, "all").tolist() == [[[False, True], [False, False]]]
    assert pool2_mask(mask, "any").tolist() == [[[True, True], [True, False]]]


# ---------------------------------------------------------------------------------------------------
# Model randomisation


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_spearman_equals_scipy(seed: int) -> None:
    from scipy.stats import spearmanr

    from wsi_scaat.metrics.randomisation import spearman

    rng = np.random.default_rng(seed)
    a = np.round(rng.random((3, 5, 4)) * 6)  # ties
    b = a + np.round(rng.standard_normal((3, 5, 4)) * 2)
    got = spearman(a, b).numpy()
    for k in range(3):
        assert got[k] == pytest.approx(spearmanr(a[k].ravel(), b[k].ravel()).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones((1, 4)), b[:1, :1, :4].reshape(1, 4)).item())


def test_randomised_copy_is_seeded_and_leaves_the_model() -> None:
    from wsi_scaat.metrics.randomisation import randomised_copy

    net = small_cnn(3)
    before = [p.clone() for p in net.parameters()]
    state = torch.random.get_rng_state()
    a, b = randomised_copy(net, 5), randomised_copy(net, 5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(net.parameters()))


def test_randomisation_matches_quantus_mprt(quantus) -> None:
    """Our figure equals the correlation Quantus's MPRT reports after randomising every layer."""
    from wsi_scaat.metrics.randomisation import randomised_copy, spearman

    net = small_cnn(3, classes=2)
    rng = np.random.default_rng(0)
    x = rng.random((6, 3, 12, 12)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 1, 0])

    def explain(model, inputs, targets, **kwargs):
        xt = torch.as_tensor(inputs).requires_grad_(True)
        out = model(xt)
        (g,) = torch.autograd.grad(out.gather(1, torch.as_tensor(targets).long()[:, None]).sum(), xt)
        return g.abs().sum(1, keepdim=True).detach().numpy()

    a = explain(net, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.MPRT(return_last_correlation=True, seed=41, disable_warnings=True,
                              similarity_func=quantus.similarity_func.correlation_spearman)  # fmt: skip
        q = metric(model=net, x_batch=x, y_batch=y, a_batch=a, explain_func=explain, channel_first=True)
    q = np.asarray(q["last"] if isinstance(q, dict) else q, dtype=np.float64)
    twin = randomised_copy(net, 42)
    mine = spearman(a[:, 0], explain(twin, x, y)[:, 0]).numpy()
    np.testing.assert_allclose(mine, q.ravel(), rtol=1e-6, atol=1e-9)
