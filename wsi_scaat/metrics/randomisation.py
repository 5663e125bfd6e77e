"""Model-randomisation sanity check (Adebayo et al., 2018): do the maps depend on what the model learned?

A saliency method that passes draws different maps for the trained model and for the same
architecture with re-initialised weights. The figure is the Spearman rank correlation, per patch,
between the two maps: near 0 is good, near 1 means the maps mostly reflect the input or the
architecture. As in Quantus's ``MPRT`` with ``return_last_correlation=True`` (every layer
randomised), maps are compared as ``|attribution|``; Spearman is invariant to Quantus's
normalisation (a positive rescaling).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from wsi_scaat.metrics.complexity import as_tensor

__all__ = ["randomised_copy", "spearman"]


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose every layer with ``reset_parameters`` is re-initialised.

    As the last model of Quantus's cascading ``MPRT`` randomisation (``layer_order="top_down"``,
    Quantus ``seed = seed - 1``): layers in reverse module order, the generator seeded with ``seed``
    before each reset, so the two agree exactly. The caller's random state is untouched. BatchNorm
    layers also lose their running statistics (``reset_parameters`` resets them).
    """
    twin = copy.deepcopy(model)
    layers = [m for _, m in twin.named_modules() if callable(getattr(m, "reset_parameters", None))]
    cuda = sorted({p.device.index or 0 for p in twin.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        for module in reversed(layers):
            torch.manual_seed(seed)
            module.reset_parameters()
    return twin


def _midranks(values: Tensor) -> Tensor:
    """Per row of (B, n), the 1-based ranks with ties given their mean rank (float64)."""
    s, perm = values.sort(1)
    n = s.shape[1]
    pos = torch.arange(n, device=s.device).expand_as(s)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(1).values
    end = torch.ones_like(new)
    end[:, :-1] = new[:, 1:]
    last = torch.where(end, pos, torch.full_like(pos, n)).flip(1).cummin(1).values.flip(1)
    ranks_sorted = (first + last + 2).to(torch.float64) / 2
    return torch.empty_like(ranks_sorted).scatter_(1, perm, ranks_sorted)


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
    """Spearman rank correlation of two batches of maps, per map: (B,) float64, ties by midrank.

    Maps of any shape (B, ...) are flattened. NaN where either map is constant (as scipy).
    """
    x = as_tensor(a, torch.float64)
    y = as_tensor(b, torch.float64).to(x.device)
    if x.shape != y.shape or x.ndim < 2:
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ValueError(f"two batches of maps of one shape expected, got {shapes}")
    rx = _midranks(x.reshape(x.shape[0], -1))
    ry = _midranks(y.reshape(y.shape[0], -1))
    rx = rx - rx.mean(1, keepdim=True)
    ry = ry - ry.mean(1, keepdim=True)
    den = (rx.square().sum(1) * ry.square().sum(1)).sqrt()
    out = (rx * ry).sum(1) / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan")))
