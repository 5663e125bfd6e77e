"""Grid artefacts of saliency maps: phase balance, Nyquist energy, and 2 x 2 pooling.

A network that downsamples with stride-2 convolutions has input gradients that alias onto the pixel
grid: a model can learn to put its gradient on one phase of that grid (every other row, say), which a
sparsity metric scores as sparsity and a figure shows as streaks. These functions measure it, and
:func:`pool2` / :func:`pool2_mask` give the 2 x 2-pooled maps (and masks) on which sparsity and
localisation no longer see the grid.

Maps are (B, H, W) or (B, C, H, W) (channels summed after ``abs``); torch tensors or numpy arrays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_scaat.metrics.complexity import as_tensor

__all__ = ["nyquist_energy", "parity_balance", "parity_ratios", "pool2", "pool2_mask"]


def _abs_maps(attr: Tensor | np.ndarray) -> Tensor:
    a = as_tensor(attr, torch.float64)
    if a.ndim == 4:
        a = a.abs().sum(1)
    if a.ndim != 3:
        raise ValueError(f"maps must be (B, H, W) or (B, C, H, W), got shape {tuple(a.shape)}")
    return a.abs()


def parity_ratios(attr: Tensor | np.ndarray) -> Tensor:
    """(B, 2) float64: map mass on odd over even rows, and on odd over even columns (0-based).

    Both are near 1 for a map without a grid artefact (for any smooth map of even size); a map with all
    its mass on even rows gives 0. NaN for an all-zero map.
    """
    a = _abs_maps(attr)
    rows = a[:, 1::2, :].sum((1, 2)) / a[:, 0::2, :].sum((1, 2))
    cols = a[:, :, 1::2].sum((1, 2)) / a[:, :, 0::2].sum((1, 2))
    return torch.stack([rows, cols], 1)


def parity_balance(attr: Tensor | np.ndarray) -> Tensor:
    """(B,) float64 in [0, 1]: the smaller of min(odd, even) / max(odd, even) over rows and columns.

    1: no phase of the pixel grid is preferred; 0: every other row (or column) is empty. NaN for an
    all-zero map.
    """
    r = parity_ratios(attr)
    balance = torch.minimum(r, 1.0 / r)
    return balance.min(1).values


def nyquist_energy(attr: Tensor | np.ndarray) -> Tensor:
    """(B,) float64: the share of the map's spectral energy (mean removed) at the Nyquist frequency.

    The energy of the 2-D DFT bins whose row or column frequency is H/2 or W/2 (the finest
    alternation the pixel grid holds), over the energy of all bins but DC. About the share of those
    bins (~2/H + 2/W) for white noise, far above it for a row- or column-striped map. NaN for a
    constant map; odd sizes have no Nyquist bin (the nearest frequency is used).
    """
    a = _abs_maps(attr)
    _, h, w = a.shape
    spec = torch.fft.fft2(a - a.mean((1, 2), keepdim=True)).abs() ** 2
    ny = torch.zeros(h, w, dtype=torch.bool, device=a.device)
    ny[h // 2, :] = True
    ny[:, w // 2] = True
    total = spec.sum((1, 2))
    out = (spec * ny).sum((1, 2)) / total
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def pool2(attr: Tensor | np.ndarray) -> Tensor:
    """|maps| averaged over 2 x 2 blocks: (B, H // 2, W // 2) float64 (a trailing odd row/column dropped)."""
    return F.avg_pool2d(_abs_maps(attr)[:, None], 2)[:, 0]


def pool2_mask(mask: Tensor | np.ndarray, rule: str = "majority") -> Tensor:
    """A (B, H, W) boolean mask on the 2 x 2 blocks of :func:`pool2`.

    ``rule``: ``"majority"`` (at least 2 of the 4 pixels; ties count as inside), ``"all"`` or ``"any"``.
    """
    m = (as_tensor(mask) != 0).to(torch.float64)
    if m.ndim != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(m.shape)}")
    share = F.avg_pool2d(m[:, None], 2)[:, 0]
    thresholds = {"majority": 0.5, "all": 1.0, "any": 0.25}
    if rule not in thresholds:
        raise ValueError(f"rule must be one of {sorted(thresholds)}, got {rule!r}")
    return share >= thresholds[rule] - 1e-12
