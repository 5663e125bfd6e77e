"""Complexity of saliency maps: Gini sparseness and entropy, batched in torch.

Both take attributions (B, H, W) or (B, C, H, W) (torch tensors or numpy arrays) and return one float64
value per map, (B,). As in Quantus (``Sparseness``, ``Complexity``), channels are *not* reduced: every
(c, h, w) value of a (B, C, H, W) map is one feature, and both metrics use ``|attr|``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_tensor", "complexity_entropy", "flat_abs", "sparseness_gini"]


def as_tensor(a: Tensor | np.ndarray, dtype: torch.dtype | None = None) -> Tensor:
    """``a`` as a torch tensor (numpy arrays are converted, tensors kept on their device), detached."""
    t = a.detach() if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))
    return t if dtype is None else t.to(dtype)


def _check_attr(attr: Tensor) -> None:
    if attr.ndim not in (3, 4):
        raise ValueError(f"attributions must be (B, H, W) or (B, C, H, W), got shape {tuple(attr.shape)}")


def flat_abs(attr: Tensor | np.ndarray) -> Tensor:
    """``|attr|`` as float64 (B, n), every channel value a feature."""
    a = as_tensor(attr, torch.float64)
    _check_attr(a)
    return a.reshape(a.shape[0], -1).abs()


def sparseness_gini(attr: Tensor | np.ndarray) -> Tensor:
    """Gini index of ``|attr|`` per map (Chalasani et al. 2020; Quantus ``Sparseness``), (B,) float64.

    With the n values sorted ascending, a_(1) <= ... <= a_(n):
    ``G = sum_i (2 i - n - 1) a_(i) / (n sum_i a_(i))``: 0 for a uniform map, ``1 - 1/n`` for a one-hot
    map; higher is sparser. An all-zero map gives 0 (Quantus adds 1e-7 to every value, which makes it
    uniform; we do not add it, so nonzero maps differ from Quantus by O(1e-7 n / sum |attr|)).
    """
    a = flat_abs(attr).sort(dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    total = a.sum(1)
    g = ((2 * i - n - 1) * a).sum(1) / (n * total)
    return torch.where(total > 0, g, torch.zeros_like(g))


def complexity_entropy(attr: Tensor | np.ndarray) -> Tensor:
    """Shannon entropy (nats) of ``|attr|`` normalised to sum 1 (Bhatt et al. 2020; Quantus ``Complexity``).

    (B,) float64 in [0, log n]: 0 for a one-hot map, ``log n`` for a uniform one; lower is simpler.
    ``0 log 0 = 0``. An all-zero map has no relevance distribution: NaN (as Quantus).
    """
    a = flat_abs(attr)
    p = a / a.sum(1, keepdim=True)  # all-zero map: 0/0 = NaN throughout
    return -torch.where(p > 0, p * p.log(), p * 0).sum(1)
