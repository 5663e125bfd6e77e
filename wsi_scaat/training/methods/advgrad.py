"""Norm-regularised adversarial training for structured gradient interpretations.

After Gong, Dou & Farnia, CVPR 2024: training on x + delta, where delta maximises the loss minus
the convex conjugate of a norm R, penalises R(input gradient) to first order and so shapes the
saliency maps. Variants: ``l1`` (sparse maps, l-inf attack == FGSM/PGD), ``elastic`` (l1 + squared
l2), ``group`` (group-sparse maps, per-group l2 attack). loss = CE(f(clamp(x + delta, 0, 1)), y).
See docs/methods.md.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsi_scaat.learning_sections import AdvGradConfig  # noqa: F401 - re-exported
from wsi_scaat.training.distributed import unwrap
from wsi_scaat.training.methods.base import Method, StepOutput, frozen_bn_stats, stats_dict


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the per-sample cross-entropy (summed over the batch) w.r.t. the input, BN stats frozen."""
    xg = x.detach().requires_grad_(True)
    with frozen_bn_stats(model):
        loss = F.cross_entropy(model(xg), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    return grad


def _safe_div(a: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """a / norm, 0 where norm is 0."""
    return torch.where(norm > 0, a / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(a))


def _to_groups(t: torch.Tensor, g: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H/g), ceil(W/g), g * g), zero-padded at the bottom and right edges."""
    b, c, h, w = t.shape
    t = F.pad(t, (0, -w % g, 0, -h % g))
    hg, wg = t.shape[-2] // g, t.shape[-1] // g
    return t.reshape(b, c, hg, g, wg, g).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hg, wg, g * g)


def _from_groups(t: torch.Tensor, g: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_to_groups`, cropped back to (B, C, h, w)."""
    b, c, hg, wg, _ = t.shape
    return t.reshape(b, c, hg, wg, g, g).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hg * g, wg * g)[..., :h, :w]


def group_normalise(t: torch.Tensor, g: int, radius: float, project: bool = False) -> torch.Tensor:
    """Each G x G group (per channel; smaller at the edges) scaled to l2 norm ``radius`` (0 stays 0).

    With ``project`` only groups longer than ``radius`` are scaled: the projection onto each group's ball.
    """
    h, w = t.shape[-2:]
    groups = _to_groups(t, g)
    norm = groups.norm(dim=-1, keepdim=True)
    if project:
        scale = torch.where(norm > radius, radius / torch.where(norm > 0, norm, torch.ones_like(norm)), 1.0)
        return _from_groups(groups * scale, g, h, w)
    return _from_groups(radius * _safe_div(groups, norm), g, h, w)


def _per_sample_normalise(t: torch.Tensor) -> torch.Tensor:
    """Each sample scaled to unit l2 norm (0 stays 0)."""
    return _safe_div(t, t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1))))


def advgrad_delta(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdvGradConfig) -> torch.Tensor:
    """The training perturbation (detached), before x + delta is clamped to [0, 1].

    fast: closed forms from g = d CE / dx at x (per-sample loss), l1: eps sign(g); elastic:
    eps sign(g) + 2 eps2 g; group: eps g_G / ||g_G||_2 per group. iterative: ``steps`` ascent steps
    from delta = 0, iterates kept in the valid range; l1: step_size*eps sign steps projected to the
    l-inf ball eps; group: step_size*eps per-group normalised steps projected to each group's l2 ball
    eps; elastic: per-sample l2-normalised steps of length step_size on
    CE(x + delta) - ||relu(|delta| - eps)||_2^2 / (4 eps2), unconstrained.
    """
    eps, g = cfg.eps, cfg.group_size
    if cfg.mode == "fast":
        grad = _input_grad(model, x, y)
        if cfg.variant == "l1":
            return eps * grad.sign()
        if cfg.variant == "elastic":
            return eps * grad.sign() + 2 * cfg.eps2 * grad
        return group_normalise(grad, g, eps)
    delta = torch.zeros_like(x)
    for _ in range(cfg.steps):
        if cfg.variant == "elastic":
            delta.requires_grad_(True)
            with frozen_bn_stats(model):
                ce = F.cross_entropy(model(x + delta), y, reduction="sum")
            penalty = F.relu(delta.abs() - eps).pow(2).sum() / (4 * cfg.eps2)
            (grad,) = torch.autograd.grad(ce - penalty, delta)
            delta = delta.detach() + cfg.step_size * _per_sample_normalise(grad)
        else:
            grad = _input_grad(model, x + delta, y)
            if cfg.variant == "l1":
                delta = torch.clamp(delta + cfg.step_size * eps * grad.sign(), -eps, eps)
            else:
                step = group_normalise(grad, g, cfg.step_size * eps)
                delta = group_normalise(delta + step, g, eps, project=True)
        delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


class AdvGradMethod(Method):
    """loss = CE(f(clamp(x + delta, 0, 1)), y); logits are those of the adversarial inputs."""

    name: ClassVar[str] = "advgrad"
    config_key: ClassVar[str | None] = "advgrad"
    config_class = AdvGradConfig
    cfg: AdvGradConfig

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        delta = advgrad_delta(unwrap(model), x, y, self.cfg)
        x_adv = (x + delta).clamp(0, 1)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, logits.detach(), stats_dict(ce=loss, delta_abs_mean=(x_adv - x).abs().mean()))
