"""Reconstruction check: exact outcomes with a model that classifies by the brightness of one region."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsi_scaat.metrics import ReconstructionResult, reconstruction_check
from wsi_scaat.metrics.reconstruction import pick_donors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CornerBright(nn.Module):
    """Class 1 when the mean of the top-left 2 x 2 pixels is above 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, :2, :2].mean((1, 2, 3)) - 0.5
        return torch.stack([-v, v], 1)


def patches(b: int, bright: bool) -> torch.Tensor:
    """(b, 3, 8, 8) patches, distinct from each other: dim noise, the top-left 2 x 2 bright if ``bright``."""
    g = torch.Generator().manual_seed(int(bright))
    x = 0.2 * torch.rand(b, 3, 8, 8, generator=g)
    if bright:
        x[:, :, :2, :2] = 0.9
    return x


def corner_map(b: int, size: int = 8) -> torch.Tensor:
    """Maps ranking the top-left quarter highest (corner cells first), the rest by position."""
    a = -torch.arange(size * size, dtype=torch.float64).reshape(size, size) / size**2
    a[: size // 4, : size // 4] += 10
    return a.repeat(b, 1, 1)


def test_salient_region_kept_or_lost() -> None:
    x, donors = patches(4, True), patches(6, False)
    net = CornerBright()
    good = reconstruction_check(net, x, corner_map(4), donors, keep=[4 / 64, 0.5, 1.0])
    assert isinstance(good, ReconstructionResult)
    assert good.keep == (4 / 64, 0.5, 1.0)
    assert good.reference.tolist() == [1, 1, 1, 1]
    assert good.unchanged.all() and good.fraction_unchanged.tolist() == [1.0, 1.0, 1.0]
    # a map that puts the corner last: keeping half the pixels loses the corner (filled from dark donors)
    bad = reconstruction_check(net, x, -corner_map(4), donors, keep=[0.5, 1.0])
    assert bad.fraction_unchanged.tolist() == [0.0, 1.0]
    assert bad.predicted[:, 0].tolist() == [0, 0, 0, 0]
    assert bad.kept.shape == (4, 2) and not bad.kept[:, 0].any()
    # keep nothing: the donor's class
    assert reconstruction_check(net, x, corner_map(4), donors, keep=0.0).fraction_unchanged.tolist() == [0.0]


def test_coarse_maps_mixed_batch_and_target() -> None:
    x = torch.cat([patches(3, True), patches(3, False)])
    donors = torch.cat([patches(5, False), patches(5, True)])
    coarse = corner_map(6, size=4)  # 2 x 2 pixel cells; the top-left cell covers the corner
    res = reconstruction_check(CornerBright(), x, coarse, donors, keep=1 / 16, seed=5, batch_size=4)
    assert res.kept.shape == (6,) and res.kept.all()  # the corner decides, whatever the donor
    # compared with a given target instead of the prediction
    target = torch.tensor([1, 0, 1, 0, 1, 0])
    with_target = reconstruction_check(CornerBright(), x, coarse, donors, keep=1 / 16, seed=5, target=target)
    assert with_target.kept.tolist() == [True, False, True, True, False, True]
    assert with_target.as_dict() == {"n": 6, "keep": [1 / 16], "fraction_unchanged": [4 / 6]}


def test_donors_seeded_and_never_identical() -> None:
    x = patches(5, True)
    donors = torch.cat([x, patches(1, False)])  # each patch is among the donors
    for seed in range(5):
        d = pick_donors(x, donors, seed)
        assert torch.equal(d, pick_donors(x, donors, seed))
        for i, j in enumerate(d.tolist()):
            assert not torch.equal(donors[j], x[i])
    seen = {tuple(pick_donors(x, donors, s).tolist()) for s in range(5)}
    assert len(seen) > 1
    # many duplicates of the patch: the exhaustive fallback finds the one other donor
    dup = torch.cat([x[:1].repeat(50, 1, 1, 1), patches(1, False)])
    assert pick_donors(x[:1], dup, 0).tolist() == [50]
    with pytest.raises(ValueError):
        pick_donors(x[:1], x[:1].repeat(3, 1, 1, 1))
    with pytest.raises(ValueError):
        pick_donors(x, donors[:, :, :4])


def test_numpy_inputs_and_train_mode_restored() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    net.train()
    x = np.random.default_rng(0).random((7, 3, 8, 8)).astype(np.float32)
    a = np.random.default_rng(1).random((7, 3, 8, 8)).astype(np.float32)
    donors = np.random.default_rng(2).random((9, 3, 8, 8)).astype(np.float32)
    r1 = reconstruction_check(net, x, a, donors, keep=[0.1, 0.9], batch_size=3)
    r2 = reconstruction_check(net, torch.from_numpy(x), torch.from_numpy(a).sum(1), torch.from_numpy(donors),
                              keep=[0.1, 0.9])  # fmt: skip
    assert net.training  # eval mode only during the check (dropout off: deterministic)
    assert torch.equal(r1.unchanged, r2.unchanged) and torch.equal(r1.donor, r2.donor)
    assert r1.unchanged.shape == (7, 2) and r1.fraction_unchanged.dtype == torch.float64
    with pytest.raises(ValueError):
        reconstruction_check(net, x, a, donors, keep=1.5)
