"""Mask-optimisation saliency: which coarse regions of a patch preserve the target-class score.

Both methods look for a mask ``m`` on a ``cells x cells`` grid, upsampled to the input size, that
keeps the target score of the perturbed input ``x * m + baseline * (1 - m)`` high while keeping little
of the image; the map, a mask or an average of masks on the grid, is upsampled bilinearly.

* :func:`mask_opt`: mask optimisation by local search (the method the project plan cites as Thakur &
  Fischmeister, 2020; reference not checked here, the formulation below is this module's own). A
  batched stochastic local search over binary masks of fixed area: each chain starts from a random
  mask keeping ``k = round(keep_prob * cells**2)`` cells; every iteration swaps ``n_swaps`` kept cells
  with as many dropped cells in every chain at once (area unchanged, so no sparsity weight to tune),
  scores all proposals in one forward pass and accepts a proposal when its score is not lower (greedy,
  ties accepted so that a chain drifts freely over cells the model ignores). Binary masks are applied
  cell-exact (nearest upsampling): with a bilinear mask a cell changes its neighbours' pixels and the
  greedy search keeps the neighbours of an informative cell as firmly as the cell itself (the blur
  baseline keeps the seams soft). The map is the time average of each chain's current mask, every
  iteration weighted by the softmax probability of the target class of its masked input, averaged over
  ``n_chains`` chains: a cell's value is the score-weighted fraction of the search during which it was
  kept, in [0, 1].
* :func:`mask_opt_gd`: a continuous mask in [0, 1] on the grid, upsampled bilinearly, optimised by
  Adam (projected by clamping) to maximise ``score - l1 * mean(m) - tv * TV(m)``, TV the mean absolute
  difference of neighbouring cells; the map is the final mask.

``score`` is the softmax probability of the target class by default (bounded, comparable between
patches; the sigmoid of the logit for single-logit models) or the raw ``"logit"``. Both functions
return (B, C, H, W) maps repeated over the C channels, so their channel sum is C times the map. They
expect the model in eval mode with the gradients it needs (see :func:`wsi_scaat.saliency.attribute`,
which arranges this).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("prob", "logit")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an (N, C, H, W) batch (replicate padding, radius ``ceil(3 sigma)``)."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_baseline(
    inputs: torch.Tensor, baseline: str | float | torch.Tensor, blur_sigma: float | None = None
) -> torch.Tensor:
    """The reference image of each input, shaped like ``inputs`` (B, C, H, W).

    ``"black"`` zeros, ``"white"`` ones, ``"mean"`` each sample's per-channel mean colour, ``"blur"`` a
    Gaussian-blurred copy (``blur_sigma`` px, default ``max(H, W) / 10``), a float (constant image) or a
    tensor broadcastable to ``inputs``.
    """
    if isinstance(baseline, torch.Tensor):
        return baseline.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if baseline == "black":
        return torch.zeros_like(inputs)
    if baseline == "white":
        return torch.ones_like(inputs)
    if baseline == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if baseline == "blur":
        sigma = max(inputs.shape[-2:]) / 10 if blur_sigma is None else blur_sigma
        return gaussian_blur(inputs, float(sigma))
    raise ValueError(
        f"unknown baseline {baseline!r}; use 'black', 'white', 'mean', 'blur', a float or a tensor"
    )


def target_score(logits: torch.Tensor, target: torch.Tensor, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, prob)`` of the target class per row of (N, K) logits (``score``: "prob" or "logit")."""
    logit = logits.gather(1, target[:, None])[:, 0]
    prob = (
        torch.sigmoid(logit) if logits.shape[1] == 1 else logits.softmax(1).gather(1, target[:, None])[:, 0]
    )
    return (prob if score == "prob" else logit), prob


def _check(cells: int, score: str, height: int, width: int) -> None:
    if not 1 <= cells <= min(height, width):
        raise ValueError(f"cells must be in [1, {min(height, width)}], got {cells}")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; use one of {SCORES}")


def _upsample(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, cells, cells) -> (N, 1, H, W), bilinear (cell values sit at cell centres)."""
    return F.interpolate(mask[:, None], size=size, mode="bilinear", align_corners=False)


def _repeat_channels(maps: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, C, H, W), a contiguous copy."""
    return maps.repeat(1, channels, 1, 1)


def _swap(mask: torch.Tensor, n_swaps: int, generator: torch.Generator | None) -> torch.Tensor:
    """``mask`` (N, n) bool with ``n_swaps`` random kept cells dropped and dropped cells kept, per row."""
    u = torch.rand(mask.shape, device=mask.device, generator=generator)
    off = torch.where(mask, u, -1.0).topk(n_swaps, dim=1).indices
    on = torch.where(mask, -1.0, u).topk(n_swaps, dim=1).indices
    out = mask.clone()
    out.scatter_(1, off, False)
    out.scatter_(1, on, True)
    return out


@torch.no_grad()
def mask_opt(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    cells: int = 8,
    keep_prob: float = 0.3,
    n_iter: int = 200,
    n_swaps: int = 2,
    n_chains: int = 1,
    baseline: str | float | torch.Tensor = "blur",
    blur_sigma: float | None = None,
    score: str = "prob",
    internal_batch_size: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Stochastic local search over fixed-area binary masks (see the module docstring); (B, C, H, W).

    ``target`` is (B,) int64. Costs ``n_iter + 1`` forward passes of ``B * n_chains`` images, at most
    ``internal_batch_size`` images per pass. ``seed`` makes the search reproducible (a private
    generator; the global RNG is left alone).
    """
    b, c, h, w = inputs.shape
    _check(cells, score, h, w)
    n = cells * cells
    k = min(max(round(keep_prob * n), 1), n - 1)
    if n_swaps < 1 or n_chains < 1 or n_iter < 0:
        raise ValueError("n_swaps and n_chains must be >= 1 and n_iter >= 0")
    n_swaps = min(n_swaps, k, n - k)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=inputs.device)
        generator.manual_seed(seed)

    x = inputs.repeat_interleave(n_chains, dim=0)
    base = make_baseline(inputs, baseline, blur_sigma).repeat_interleave(n_chains, dim=0)
    t = target.repeat_interleave(n_chains, dim=0)
    chunk = x.shape[0] if internal_batch_size is None else max(1, internal_batch_size)

    def evaluate(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, probs = [], []
        for i in range(0, x.shape[0], chunk):
            m = F.interpolate(mask[i : i + chunk].view(-1, 1, cells, cells).to(x.dtype), size=(h, w))
            xi, bi = x[i : i + chunk], base[i : i + chunk]
            s, p = target_score(model(bi + m * (xi - bi)), t[i : i + chunk], score)
            scores.append(s)
            probs.append(p)
        return torch.cat(scores), torch.cat(probs)

    u = torch.rand(x.shape[0], n, device=x.device, generator=generator)
    mask = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
    mask.scatter_(1, u.topk(k, dim=1).indices, True)
    cur, prob = evaluate(mask)
    total = prob[:, None] * mask
    weight = prob.clone()
    for _ in range(n_iter):
        proposal = _swap(mask, n_swaps, generator)
        new, new_prob = evaluate(proposal)
        accept = new >= cur
        mask = torch.where(accept[:, None], proposal, mask)
        cur = torch.where(accept, new, cur)
        prob = torch.where(accept, new_prob, prob)
        total += prob[:, None] * mask
        weight += prob
    maps = total / weight.clamp_min(torch.finfo(total.dtype).tiny)[:, None]
    maps = maps.view(b, n_chains, cells, cells).mean(1)
    return _repeat_channels(_upsample(maps.to(inputs.dtype), (h, w)), c)


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """Per-sample anisotropic TV of (N, h, w): mean |vertical diff| + mean |horizontal diff|."""
    tv = mask.new_zeros(mask.shape[0])
    if mask.shape[1] > 1:
        tv = tv + (mask[:, 1:] - mask[:, :-1]).abs().mean(dim=(1, 2))
    if mask.shape[2] > 1:
        tv = tv + (mask[:, :, 1:] - mask[:, :, :-1]).abs().mean(dim=(1, 2))
    return tv


def mask_opt_gd(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    cells: int = 8,
    n_iter: int = 100,
    lr: float = 0.1,
    l1: float = 0.05,
    tv: float = 0.2,
    init: float = 0.5,
    baseline: str | float | torch.Tensor = "blur",
    blur_sigma: float | None = None,
    score: str = "prob",
) -> torch.Tensor:
    """Adam on a continuous ``cells x cells`` mask (see the module docstring); (B, C, H, W).

    Maximises ``score(x * m + baseline * (1 - m)) - l1 * mean(m) - tv * TV(m)`` per sample, ``m``
    clamped to [0, 1] after each step and started at ``init``; ``cells = min(H, W)`` of a square input
    optimises at input resolution. Deterministic; ``n_iter`` forward and backward passes of B images.
    """
    b, c, h, w = inputs.shape
    _check(cells, score, h, w)
    x = inputs.detach()
    base = make_baseline(x, baseline, blur_sigma).detach()
    mask = torch.full((b, cells, cells), float(init), device=x.device, dtype=x.dtype).clamp_(0, 1)
    mask.requires_grad_(True)
    optimizer = torch.optim.Adam([mask], lr=lr)
    with torch.enable_grad():
        for _ in range(n_iter):
            optimizer.zero_grad(set_to_none=True)
            m = _upsample(mask, (h, w))
            s, _ = target_score(model(base + m * (x - base)), target, score)
            objective = s - l1 * mask.mean(dim=(1, 2)) - tv * total_variation(mask)
            (-objective.sum()).backward(inputs=[mask])
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
    return _repeat_channels(_upsample(mask.detach(), (h, w)), c)
