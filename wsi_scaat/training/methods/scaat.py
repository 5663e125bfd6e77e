"""SCAAT: saliency-constrained adaptive adversarial training (this project's formulation).

After Xu et al., BMVC 2023, which has no public code. Per batch: the target-logit input-gradient
saliency of the current model picks, per sample, the least salient ``mask_ratio`` of the pixels
(mask M); only those may be perturbed, each within eps_i = eps * (1 - r_i) ** gamma where r_i is the
pixel's saliency rank in [0, 1]. A PGD search (random start, sign steps) maximises
KL(f(x) || f(x + M delta)), and the loss is CE(f(x), y) + lam * KL(f(x) || f(x + M delta)) with the
clean distribution detached as the target. See docs/methods.md.

Ablation knobs (``train.scaat``; defaults are the chosen setting, docs/methods.md has the ablation):
``saliency_bn`` (BatchNorm of the saliency pass in train or eval mode), ``rank_saliency`` (the
gradient of the input, or of a Gaussian-smoothed input), ``mask`` (the hard lowest-``mask_ratio``
set, or pixels sampled with a probability falling with their saliency rank), ``detach_target``
(whether the KL term's gradient also flows through the clean logits) and ``kl`` (clean-to-perturbed,
or symmetric).

Cost: one clean forward serves the saliency (input-only gradient, graph kept), the KL target and the
CE term; each PGD step is a forward plus an input-only backward with BatchNorm statistics frozen;
one more forward gives the KL term. On CPU the search passes run on a channels-last copy of the
batch. With ``bf16_search`` the saliency comes from a separate bfloat16 pass and the PGD passes run
under bfloat16 autocast too (``auto``: only where training itself does not already run in bf16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from wsi_scaat.learning_sections import ScaatConfig  # noqa: F401 - re-exported
from wsi_scaat.training.distributed import uniform_like_batch, unwrap
from wsi_scaat.training.methods.base import (
    Method,
    StepOutput,
    fast_bf16,
    forward_with_saliency,
    frozen_bn_stats,
    kl_to_target,
    num_selected,
    search_autocast,
    search_layout,
    stable_argsort,
    stats_dict,
)


def search_in_bf16(device: torch.device, bf16_search: bool | str) -> bool:
    """Whether the saliency and PGD passes get a bfloat16 autocast of their own.

    ``auto``: where ``device`` computes bf16 natively, unless the step already runs under bf16
    autocast (``train.amp``): then the passes are bf16 anyway, and a separate saliency pass would only
    add a forward.
    """
    if bf16_search != "auto":
        return bool(bf16_search)
    under_bf16 = (
        torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16
    )
    return fast_bf16(device) and not under_bf16


def scaat_effective_ratio(mask_ratio: float, warmup_epochs: float, progress: float) -> float:
    """The mask ratio after ``progress`` epochs: mask_ratio * min(1, progress / warmup_epochs)."""
    if warmup_epochs <= 0:
        return mask_ratio
    return mask_ratio * min(1.0, max(0.0, progress) / warmup_epochs)


def sampled_mask_probability(r: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Probability that a pixel of saliency rank ``r`` in [0, 1] (0: least salient) may be perturbed.

    Falls linearly with the rank and averages ``mask_ratio`` over uniform ranks:
    ``min(1, 2 m (1 - r))`` for ``m <= 1/2``, ``1 - min(1, 2 (1 - m) r)`` above.
    """
    m = float(mask_ratio)
    if m <= 0.5:
        return (2 * m * (1 - r)).clamp(max=1.0)
    return 1 - (2 * (1 - m) * r).clamp(max=1.0)


def scaat_mask_and_budget(
    saliency: torch.Tensor,
    mask_ratio: float,
    eps: float,
    gamma: float,
    mode: str = "lowest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The perturbation mask and per-pixel budget of a (B, H, W) saliency map.

    Pixels are ranked per sample by ascending saliency (stable sort: ties go to the lower flat index,
    row-major), r = rank / (H * W - 1). ``mode="lowest"``: M (B, 1, H, W) is 1 on the
    ``floor(mask_ratio * H * W)`` lowest-ranked pixels, 0 elsewhere; ``"sampled"``: each pixel is in M
    with probability :func:`sampled_mask_probability` (one uniform draw per pixel, from
    ``generator``). eps_map (B, 1, H, W) = eps * (1 - r) ** gamma everywhere.
    """
    b, h, w = saliency.shape
    n = h * w
    dtype = saliency.dtype if saliency.is_floating_point() else torch.float32
    order = stable_argsort(saliency.reshape(b, n))
    positions = torch.arange(n, device=saliency.device).expand(b, n)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    r = rank.to(dtype) / max(n - 1, 1)
    if mode == "lowest":
        mask = (rank < num_selected(mask_ratio, n)).to(dtype)
    elif mode == "sampled":
        draw = uniform_like_batch(torch.empty(b, n, dtype=dtype, device=saliency.device), generator)
        mask = (draw < sampled_mask_probability(r, mask_ratio)).to(dtype)
    else:
        raise ValueError(f"mask mode must be 'lowest' or 'sampled', got {mode!r}")
    eps_map = eps * (1.0 - r).pow(gamma)
    return mask.reshape(b, 1, h, w), eps_map.reshape(b, 1, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (B, C, H, W) blurred per channel with a Gaussian of ``sigma`` pixels (reflect padding)."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@contextmanager
def bn_eval(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, BatchNorm layers use their running statistics (eval mode) when ``enabled``."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training] if enabled else []
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, detach_p: bool) -> torch.Tensor:
    """Batch-mean KL(softmax(p) || softmax(q)) in float32; ``detach_p``: p is a constant."""
    log_p = F.log_softmax(p_logits.float(), 1)
    if detach_p:
        log_p = log_p.detach()
    log_q = F.log_softmax(q_logits.float(), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def scaat_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor,
    eps_map: torch.Tensor,
    steps: int,
    alpha: float,
    generator: torch.Generator | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """PGD for max KL(target || f(x + delta)) with |delta| <= eps_map on M, 0 off M, x + delta in [0, 1].

    ``delta`` starts uniformly in [-eps_i, eps_i] per element, then takes ``steps`` sign-steps of
    size ``alpha``, each projected to the budget and the valid range. Only input gradients are taken
    and BatchNorm running statistics are left as they were; with ``bf16`` the model runs under
    bfloat16 autocast. Returns the detached delta (B, C, H, W).
    """
    x = search_layout(x)
    bound = (eps_map * mask).to(x.dtype)  # 0 outside M: the projection keeps delta at 0 there
    noise = uniform_like_batch(x, generator)  # keeps x's memory format
    delta = (x + (2 * noise - 1) * bound).clamp(0, 1) - x
    with frozen_bn_stats(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            with search_autocast(x, bf16):
                logits = model(x + delta)
            # Summed, not averaged: the sign step ignores scale and a larger objective resists fp16 underflow.
            objective = kl_to_target(logits, target_probs, reduction="sum")
            (grad,) = torch.autograd.grad(objective, delta)
            delta = torch.clamp(delta.detach() + alpha * grad.sign(), -bound, bound)
            delta = (x + delta).clamp(0, 1) - x
    return (delta * mask).detach()


class ScaatMethod(Method):
    """loss = CE(f(x), y) + lam * KL(f(x) || f(x + M delta)), clean distribution detached."""

    name: ClassVar[str] = "scaat"
    config_key: ClassVar[str | None] = "scaat"
    config_class = ScaatConfig
    cfg: ScaatConfig

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        cfg = self.cfg
        ratio = scaat_effective_ratio(cfg.mask_ratio, cfg.warmup_epochs, progress)
        if num_selected(ratio, x.shape[-2] * x.shape[-1]) == 0 or cfg.eps == 0 or cfg.lam == 0:
            logits = model(x)  # nothing may be perturbed: the KL term is 0, skip its cost
            ce = F.cross_entropy(logits, y)
            return StepOutput(ce, logits.detach(), stats_dict(ce=ce, kl=0.0, mask_ratio=ratio))
        bf16 = search_in_bf16(x.device, cfg.bf16_search)
        net = unwrap(model)  # for every forward but the first of the loss (see methods.base)
        separate = bf16 or cfg.saliency_bn == "eval" or cfg.rank_saliency != "gradient"
        if separate:  # a saliency pass of its own, then a plain clean forward
            xs = gaussian_blur(x, cfg.rank_sigma) if cfg.rank_saliency == "smoothed_input" else x
            with frozen_bn_stats(net), bn_eval(net, cfg.saliency_bn == "eval"), search_autocast(x, bf16):
                _, grad = forward_with_saliency(net, search_layout(xs), y, keep_graph=False)
            logits = model(x)
        else:  # one clean forward gives the saliency, the CE term and the KL target
            logits, grad = forward_with_saliency(model, x, y)
        ce = F.cross_entropy(logits, y)
        target = F.softmax(logits.detach().float(), dim=1)
        mask, eps_map = scaat_mask_and_budget(grad.abs().sum(1), ratio, cfg.eps, cfg.gamma, cfg.mask)
        alpha = cfg.eps if cfg.alpha is None else cfg.alpha
        delta = scaat_perturbation(net, x, target, mask, eps_map, cfg.steps, alpha, bf16=bf16)
        perturbed = net(x + delta)
        if cfg.detach_target:
            kl = kl_to_target(perturbed, target)
        else:
            kl = kl_divergence(logits, perturbed, detach_p=False)
        if cfg.kl == "symmetric":
            kl = 0.5 * (kl + kl_divergence(perturbed, logits, cfg.detach_target))
        loss = ce + cfg.lam * kl
        return StepOutput(loss, logits.detach(), stats_dict(ce=ce, kl=kl, mask_ratio=ratio))
