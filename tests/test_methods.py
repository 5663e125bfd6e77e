"""Training methods: the step contract, learning, and the perturbations' defining properties."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from wsi_scaat.errors import ConfigError
from wsi_scaat.training.methods import (
    METHODS,
    AdvGradConfig,
    Method,
    ScaatConfig,
    SgtConfig,
    StepOutput,
    advgrad_delta,
    build_method,
    gradient_saliency,
    scaat_effective_ratio,
    scaat_mask_and_budget,
    scaat_perturbation,
    sgt_mask_input,
)
from wsi_scaat.training.methods.advgrad import group_normalise
from wsi_scaat.training.methods.base import forward_with_saliency

K = 3


class TinyCNN(nn.Module):
    """conv-BN-ReLU, strided conv-ReLU, global average pool, linear: a few thousand parameters."""

    def __init__(self, channels: int = 3, classes: int = K) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - 0.5) / 0.25).mean((2, 3)))


def toy_batch(n: int = 24, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c has a bright square in colour channel c on a noisy background: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 3, size, size, generator=g)
    y = torch.arange(n) % K
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        x[i, y[i], r : r + 6, c : c + 6] += 0.6
    return x.clamp(0, 1), y


def train_cfg(**sections: object) -> SimpleNamespace:
    base = {"scaat": ScaatConfig(warmup_epochs=0), "advgrad": AdvGradConfig(), "sgt": SgtConfig()}
    return SimpleNamespace(**{**base, **sections})


CASES = {
    "erm": ("erm", train_cfg()),
    "scaat": ("scaat", train_cfg()),
    "scaat-2steps": ("scaat", train_cfg(scaat=ScaatConfig(steps=2, warmup_epochs=0, gamma=2.0))),
    "scaat-bf16": ("scaat", train_cfg(scaat=ScaatConfig(warmup_epochs=0, bf16_search=True))),
    # the ablation knobs of SCAAT, each away from the default
    "scaat-bn-eval": ("scaat", train_cfg(scaat=ScaatConfig(warmup_epochs=0, saliency_bn="eval"))),
    "scaat-smoothed": (
        "scaat",
        train_cfg(scaat=ScaatConfig(warmup_epochs=0, rank_saliency="smoothed_input")),
    ),
    "scaat-sampled": ("scaat", train_cfg(scaat=ScaatConfig(warmup_epochs=0, mask="sampled"))),
    "scaat-attached": ("scaat", train_cfg(scaat=ScaatConfig(warmup_epochs=0, detach_target=False))),
    "scaat-symmetric": ("scaat", train_cfg(scaat=ScaatConfig(warmup_epochs=0, kl="symmetric"))),
    "sgt": ("sgt", train_cfg()),
    **{
        f"advgrad-{v}-{m}": ("advgrad", train_cfg(advgrad=AdvGradConfig(variant=v, mode=m, steps=3)))
        for v in ("l1", "elastic", "group")
        for m in ("fast", "iterative")
    },
}


def make(case: str) -> Method:
    name, cfg = CASES[case]
    return build_method(name, cfg)


# -- the contract every method keeps --------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_step_contract(case: str, x_requires_grad: bool) -> None:
    torch.manual_seed(0)
    model = TinyCNN().train()
    x, y = toy_batch(8)
    x.requires_grad_(x_requires_grad)
    out = make(case).step(model, x, y, progress=5.0)
    assert isinstance(out, StepOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.logits.shape == (8, K) and not out.logits.requires_grad
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.stats.values()) and "ce" in out.stats
    assert all(p.grad is None for p in model.parameters())
    assert x.requires_grad is x_requires_grad and x.grad is None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("case", ["scaat", "sgt", "advgrad-l1-fast", "advgrad-group-iterative"])
def test_step_leaves_existing_grads(case: str) -> None:
    torch.manual_seed(0)
    model = TinyCNN().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    make(case).step(model, *toy_batch(8), progress=5.0)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_falls(case: str) -> None:
    torch.manual_seed(0)
    model = TinyCNN().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    method, (x, y) = make(case), toy_batch(24)
    losses = []
    for i in range(20):
        opt.zero_grad(set_to_none=True)
        out = method.step(model, x, y, progress=i / 20)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses


LOSS_FORWARDS = {"erm": 1, "sgt": 2} | {case: 2 for case in CASES if case.startswith("scaat")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_loss_forwards_update_batchnorm(case: str) -> None:
    model = TinyCNN().train()
    bn = model.body[1]
    make(case).step(model, *toy_batch(8), progress=5.0)
    assert int(bn.num_batches_tracked) == LOSS_FORWARDS.get(case, 1)  # advgrad: the adversarial forward
    assert bn.track_running_stats


def test_registry_and_configs() -> None:
    assert set(METHODS) == {"erm", "scaat", "advgrad", "sgt"}
    method = build_method("scaat", train_cfg(scaat=ScaatConfig(eps=0.05)))
    assert method.cfg.eps == 0.05 and method.name == "scaat"
    assert build_method("sgt", SimpleNamespace()).cfg == SgtConfig()  # section absent: defaults
    with pytest.raises(ConfigError, match="unknown training method"):
        build_method("madry", train_cfg())
    for bad in ({"mask_ratio": 1.5}, {"eps": -0.1}, {"alpha": 0.0}, {"steps": -1}, {"maks_ratio": 0.5}):
        with pytest.raises(ValidationError):
            ScaatConfig(**bad)
    with pytest.raises(ValidationError):
        AdvGradConfig(variant="l2")
    with pytest.raises(ValidationError):
        SgtConfig(mask_fraction=2)
    for cls in (ScaatConfig, AdvGradConfig, SgtConfig):
        assert all(f.description for f in cls.model_fields.values())


# -- saliency --------------------------------------------------------------------------------------


def test_saliency_matches_captum() -> None:
    from captum.attr import Saliency

    torch.manual_seed(0)
    model = TinyCNN()
    x, y = toy_batch(6)
    model.train()
    model(x)  # non-trivial running statistics
    model.eval()
    reference = Saliency(model).attribute(x.clone().requires_grad_(), target=y, abs=True)
    torch.testing.assert_close(gradient_saliency(model, x, y), reference.sum(1))  # SCAAT
    torch.testing.assert_close(gradient_saliency(model, x, y, channels=True), reference)  # SGT
    logits, grad = forward_with_saliency(model, x, y)  # the path the steps use
    torch.testing.assert_close(grad.abs(), reference)
    torch.testing.assert_close(logits.detach(), model(x))


# -- SCAAT -----------------------------------------------------------------------------------------


def test_scaat_warmup() -> None:
    assert scaat_effective_ratio(0.5, 2.0, 0.0) == 0.0
    assert scaat_effective_ratio(0.5, 2.0, 1.0) == 0.25
    assert scaat_effective_ratio(0.5, 2.0, 2.0) == 0.5 and scaat_effective_ratio(0.5, 2.0, 7.5) == 0.5
    assert scaat_effective_ratio(0.5, 0.0, 0.0) == 0.5


def test_scaat_step_at_progress_zero_is_erm() -> None:
    torch.manual_seed(0)
    model = TinyCNN().train()
    x, y = toy_batch(8)
    out = build_method("scaat", train_cfg(scaat=ScaatConfig())).step(model, x, y, progress=0.0)
    assert out.stats["mask_ratio"] == 0.0 and out.stats["kl"] == 0.0
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)),
    ties=st.booleans(),
    mask_ratio=st.floats(0, 1),
    eps=st.floats(0, 0.5),
    gamma=st.floats(0, 4),
    steps=st.integers(0, 2),
    alpha=st.floats(0.01, 0.5),
)
def test_scaat_perturbation_properties(
    seed: int,
    shape: tuple[int, int, int, int],
    ties: bool,
    mask_ratio: float,
    eps: float,
    gamma: float,
    steps: int,
    alpha: float,
) -> None:
    b, c, h, w = shape
    n = h * w
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.2, x.round(), x)  # pixels at the range edges
    saliency = torch.rand(b, h, w, generator=g)
    if ties:
        saliency = (saliency * 3).floor()
    mask, eps_map = scaat_mask_and_budget(saliency, mask_ratio, eps, gamma)
    assert mask.shape == eps_map.shape == (b, 1, h, w)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # M: exactly floor(mask_ratio * H * W) pixels per sample, none more salient than an unmasked one
    k = math.floor(mask_ratio * n + 1e-9)
    assert mask.flatten(1).sum(1).tolist() == [float(k)] * b
    s, m, e = saliency.reshape(b, n), mask.reshape(b, n).bool(), eps_map.reshape(b, n)
    for i in range(b):
        if 0 < k < n:
            assert s[i][m[i]].max() <= s[i][~m[i]].min()
        lower = s[i][:, None] < s[i][None, :]  # eps_map non-increasing in saliency
        assert bool((e[i][:, None] >= e[i][None, :])[lower].all())
        assert float(e[i].max()) <= eps + 1e-7 and float(e[i].min()) >= 0
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, K))  # fmt: skip
    target = torch.softmax(torch.randn(b, K, generator=g), dim=1)
    delta = scaat_perturbation(model, x, target, mask, eps_map, steps, alpha, generator=g)
    assert delta.shape == x.shape and not delta.requires_grad
    assert bool((delta * (1 - mask) == 0).all())  # exactly zero outside M
    assert bool((delta.abs() <= eps_map + 1e-6).all())
    assert bool(((x + delta >= 0) & (x + delta <= 1)).all())


def test_scaat_perturbation_is_adversarial_and_seeded() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = toy_batch(8)
    target = torch.softmax(model(x), 1).detach()
    mask, eps_map = scaat_mask_and_budget(gradient_saliency(model, x, y), 0.5, 0.1, 1.0)

    def kl(d: torch.Tensor) -> float:
        return F.kl_div(F.log_softmax(model(x + d), 1), target, reduction="batchmean").item()

    d0 = scaat_perturbation(model, x, target, mask, eps_map, 0, 0.1, torch.Generator().manual_seed(1))
    d3 = scaat_perturbation(model, x, target, mask, eps_map, 3, 0.05, torch.Generator().manual_seed(1))
    again = scaat_perturbation(model, x, target, mask, eps_map, 3, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(d3, again)
    assert kl(d3) > kl(d0) > 0


# -- advgrad ---------------------------------------------------------------------------------------


def ce_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy input gradient, computed independently of the package."""
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    return x.grad


def group_norms(t: torch.Tensor, g: int) -> list[torch.Tensor]:
    """l2 norm of every G x G block per channel, remainder blocks included (plain slicing)."""
    h, w = t.shape[-2:]
    return [
        t[:, :, r : r + g, c : c + g].flatten(2).norm(dim=2) for r in range(0, h, g) for c in range(0, w, g)
    ]


@pytest.fixture
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return TinyCNN().eval(), *toy_batch(6, size=18)


def test_advgrad_fast_l1_is_fgsm(setup: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = setup
    fgsm = 0.03 * ce_input_grad(model, x, y).sign()
    torch.testing.assert_close(advgrad_delta(model, x, y, AdvGradConfig(eps=0.03)), fgsm)


def test_advgrad_fast_elastic_closed_form(setup: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = setup
    g = ce_input_grad(model, x, y)
    cfg = AdvGradConfig(variant="elastic", eps=0.02, eps2=0.5)
    torch.testing.assert_close(advgrad_delta(model, x, y, cfg), 0.02 * g.sign() + 2 * 0.5 * g)


@pytest.mark.parametrize("group", [4, 5, 18, 1])
def test_advgrad_fast_group_norms(setup: tuple[nn.Module, torch.Tensor, torch.Tensor], group: int) -> None:
    model, x, y = setup  # 18 px: groups of 4 and 5 leave remainder groups of 2 and 3
    g = ce_input_grad(model, x, y)
    delta = advgrad_delta(model, x, y, AdvGradConfig(variant="group", eps=0.05, group_size=group))
    for dn, gn in zip(group_norms(delta, group), group_norms(g, group), strict=True):
        torch.testing.assert_close(dn, torch.where(gn > 0, 0.05, 0.0))
    assert F.cosine_similarity(delta.flatten(), g.flatten(), dim=0) > 0.5  # each group points along g


def test_group_normalise_zero_groups_and_projection() -> None:
    g = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    g[0, 1, 4:8, 4:8] = 0  # a zero-gradient group stays zero
    out = group_normalise(g, 4, 0.1)
    norms = torch.stack(group_norms(out, 4))
    assert float(norms.min()) == 0.0 and torch.allclose(norms[norms > 0], torch.tensor(0.1))
    torch.testing.assert_close(group_normalise(out * 0.5, 4, 0.1, project=True), out * 0.5)  # inside: kept
    torch.testing.assert_close(group_normalise(out * 3, 4, 0.1, project=True), out)  # outside: scaled back


def test_advgrad_iterative_l1_stays_in_ball(setup: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = setup
    delta = advgrad_delta(model, x, y, AdvGradConfig(mode="iterative", eps=0.03))
    assert float(delta.abs().max()) <= 0.03 + 1e-7
    assert float(delta.abs().max()) > 0.02  # 7 steps of 0.3 eps reach the boundary
    assert bool(((x + delta >= 0) & (x + delta <= 1)).all())
    loss = lambda d: F.cross_entropy(model(x + d), y).item()  # noqa: E731
    assert loss(delta) > loss(torch.zeros_like(x))


@pytest.mark.parametrize("group", [4, 5])
def test_advgrad_iterative_group_stays_in_balls(
    setup: tuple[nn.Module, torch.Tensor, torch.Tensor], group: int
) -> None:
    model, x, y = setup
    cfg = AdvGradConfig(variant="group", mode="iterative", eps=0.05, group_size=group)
    delta = advgrad_delta(model, x, y, cfg)
    norms = torch.stack(group_norms(delta, group))
    assert float(norms.max()) <= 0.05 + 1e-6 and float(norms.max()) > 0.04
    assert bool(((x + delta >= 0) & (x + delta <= 1)).all())


def test_advgrad_iterative_elastic(setup: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = setup
    cfg = AdvGradConfig(variant="elastic", mode="iterative", eps=0.01, eps2=0.01, steps=7, step_size=0.3)
    delta = advgrad_delta(model, x, y, cfg)
    assert bool(((x + delta >= 0) & (x + delta <= 1)).all())
    assert float(delta.flatten(1).norm(dim=1).max()) <= 7 * 0.3 + 1e-5  # at most steps x step_size
    loss = lambda d: F.cross_entropy(model(x + d), y).item()  # noqa: E731
    assert loss(delta) > loss(torch.zeros_like(x))


# -- SGT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_sgt_mask_input(fraction: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    n = x[0].numel()
    saliency = torch.stack([torch.randperm(n, generator=g) for _ in range(4)]).reshape(x.shape).float()
    saliency = saliency * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)  # |.| distinct
    out = sgt_mask_input(x, saliency, fraction, generator=g)
    k = math.floor(fraction * n + 1e-9)
    changed = (out != x).flatten(1)
    lowest = saliency.abs().flatten(1).argsort(1)[:, :k]
    expected = torch.zeros_like(changed).scatter_(1, lowest, True)
    assert changed.sum(1).tolist() == [k] * 4
    assert torch.equal(changed, expected)  # exactly the k lowest-|saliency| elements
    assert bool(((out >= 0) & (out <= 1)).all())
    assert torch.equal(out.flatten(1)[~changed], x.flatten(1)[~changed])


# -- SCAAT's ablation knobs ------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_sampled_mask_probability_averages_the_ratio_and_falls_with_rank(ratio: float) -> None:
    from wsi_scaat.training.methods.scaat import sampled_mask_probability

    r = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    p = sampled_mask_probability(r, ratio)
    assert p.mean().item() == pytest.approx(ratio, abs=1e-6)
    assert (p.diff() <= 0).all() and p.min() >= 0 and p.max() <= 1
    sal = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0))
    mask, eps_map = scaat_mask_and_budget(sal, ratio, 0.1, 1.0, "sampled", torch.Generator().manual_seed(1))
    assert abs(mask.mean().item() - ratio) < 0.03  # 4096 Bernoulli draws
    low = sal.reshape(4, -1) < sal.reshape(4, -1).median(1, keepdim=True).values
    assert mask.reshape(4, -1)[low].mean() > mask.reshape(4, -1)[~low].mean()  # less salient: more often
    again, _ = scaat_mask_and_budget(sal, ratio, 0.1, 1.0, "sampled", torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)
    lowest, eps_lowest = scaat_mask_and_budget(sal, ratio, 0.1, 1.0)
    assert torch.equal(eps_map, eps_lowest)  # the budget does not depend on how the mask is drawn


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    from wsi_scaat.training.methods.scaat import gaussian_blur

    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)
    dot = torch.zeros(1, 1, 21, 21)
    dot[0, 0, 10, 10] = 1.0
    out = gaussian_blur(dot, 1.5)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6) and out[0, 0, 10, 10] < 0.1
    assert torch.allclose(out, out.flip(-1)) and torch.allclose(out, out.transpose(-1, -2))


def test_bn_eval_uses_running_statistics_and_restores_train_mode() -> None:
    from wsi_scaat.training.methods.scaat import bn_eval

    model = TinyCNN().train()
    bn = model.body[1]
    x = toy_batch(8)[0]
    with bn_eval(model, True):
        assert not bn.training
        eval_out = model(x)
    assert bn.training and int(bn.num_batches_tracked) == 0
    model.eval()
    assert torch.allclose(model(x), eval_out)


def test_attached_target_trains_the_clean_logits_through_the_kl_term() -> None:
    """With detach_target=False the KL term has a gradient through the clean forward as well."""
    from wsi_scaat.training.methods.scaat import kl_divergence

    p = torch.randn(4, 3, requires_grad=True)
    q = torch.randn(4, 3, requires_grad=True)
    detached = kl_divergence(p, q, detach_p=True)
    (gp,) = torch.autograd.grad(detached, p, allow_unused=True)
    assert gp is None
    attached = kl_divergence(p, q, detach_p=False)
    (gp,) = torch.autograd.grad(attached, p)
    assert gp.abs().sum() > 0
    expected = F.kl_div(F.log_softmax(q, 1), F.softmax(p, 1), reduction="batchmean")
    assert attached.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bf16_search_is_not_doubled_under_bf16_training() -> None:
    """``bf16_search: auto`` adds its own bf16 passes only where training does not already run in bf16."""
    from wsi_scaat.training.methods.base import fast_bf16
    from wsi_scaat.training.methods.scaat import search_in_bf16

    cpu = torch.device("cpu")
    assert search_in_bf16(cpu, "auto") == fast_bf16(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert search_in_bf16(cpu, "auto") is False
        assert search_in_bf16(cpu, True) is True
    assert search_in_bf16(cpu, False) is False
