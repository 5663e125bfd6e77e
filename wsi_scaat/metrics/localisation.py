"""Localisation of saliency maps against a binary ground-truth mask, batched in torch.

Attributions (B, H, W) or (B, C, H, W) and masks (B, H, W) of the same H x W (torch tensors or numpy
arrays; nonzero = inside). Every metric returns (B,) float64 and NaN where the mask is empty.
As in Quantus, the *raw* (signed) attributions are used (Quantus's default ``abs=False``; its default
max-normalisation is a positive rescaling, to which all four metrics are invariant): pass ``attr.abs()``
or ``attr.clamp(min=0)`` for the other conventions. A (B, C, H, W) map is treated as C H W features,
each with the mask value of its pixel (the mask broadcast over channels); Quantus has no definition
for that case (its masks must have one channel).

Deliberate differences from Quantus 0.6:

* ``pointing_game`` returns NaN for an empty mask; Quantus stores NaN into a bool array, so it
  reports a hit (True).
* ``relevance_rank_accuracy`` counts ties at the K-th largest value fractionally (the expected hit
  count over random tie breaks); Quantus uses the order of ``np.argsort``. Equal without ties.

Every metric takes an optional ``valid`` mask (B, H, W): pixels outside it (glass, for instance) are
left out as if the map had no such pixel: they are neither inside nor outside the mask, cannot be the
maximum, carry no relevance and are not ranked. ``valid=None`` (all pixels) is Quantus's definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from wsi_scaat.metrics.complexity import as_tensor

__all__ = ["auroc_localisation", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy"]


Mask = Tensor | np.ndarray


def _flatten(attr: Mask, mask: Mask, valid: Mask | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Attributions (B, n) float64, the mask and the valid pixels (B, n) bool, broadcast over channels.

    The mask is restricted to the valid pixels.
    """
    a = as_tensor(attr, torch.float64)
    masks = [as_tensor(mask).to(a.device) != 0]
    masks.append(torch.ones_like(masks[0]) if valid is None else as_tensor(valid).to(a.device) != 0)
    for m in masks:
        if m.ndim != 3 or a.ndim not in (3, 4) or a.shape[0] != m.shape[0] or a.shape[-2:] != m.shape[-2:]:
            raise ValueError(
                "attributions (B, [C,] H, W) and masks (B, H, W) must match, "
                f"got {tuple(a.shape)} and {tuple(m.shape)}"
            )
    m, v = masks[0] & masks[1], masks[1]
    if a.ndim == 4:
        m, v = m[:, None].expand_as(a), v[:, None].expand_as(a)
    return a.reshape(a.shape[0], -1), m.reshape(m.shape[0], -1), v.reshape(v.shape[0], -1)


def _floor_invalid(a: Tensor, v: Tensor) -> Tensor:
    """``a`` with the invalid pixels at -inf: below every valid value."""
    return torch.where(v, a, torch.full_like(a, -math.inf))


def _nan_where_empty(score: Tensor, m: Tensor) -> Tensor:
    return torch.where(m.any(1), score, torch.full_like(score, float("nan")))


def pointing_game(attr: Mask, mask: Mask, valid: Mask | None = None) -> Tensor:
    """1.0 if the maximum of ``attr`` lies in ``mask``, else 0.0 (Zhang et al. 2018; Quantus PointingGame).

    With several maximal values, a hit if any of them lies in the mask (as Quantus). NaN: empty mask.
    """
    a, m, v = _flatten(attr, mask, valid)
    a = _floor_invalid(a, v)
    top = (a == a.max(1, keepdim=True).values) & v
    return _nan_where_empty((top & m).any(1).to(torch.float64), m)


def relevance_mass_accuracy(attr: Mask, mask: Mask, valid: Mask | None = None) -> Tensor:
    """Relevance inside the mask over total relevance, ``sum(attr * mask) / sum(attr)`` (Arras et al. 2022).

    As Quantus ``RelevanceMassAccuracy``. In [0, 1] for non-negative maps; NaN: empty mask or zero sum.
    """
    a, m, v = _flatten(attr, mask, valid)
    return _nan_where_empty((a * m).sum(1) / (a * v).sum(1), m)


def relevance_rank_accuracy(attr: Mask, mask: Mask, valid: Mask | None = None) -> Tensor:
    """Fraction of the K highest-ranked features that lie in the mask, K = mask size (Arras et al. 2022).

    As Quantus ``RelevanceRankAccuracy``; values tied with the K-th largest count fractionally:
    ``(hits above t + (K - n above t) * ties inside / ties) / K`` with t the K-th largest value.
    NaN: empty mask.
    """
    a, m, v = _flatten(attr, mask, valid)
    a = _floor_invalid(a, v)  # K <= valid pixels: the top K are valid pixels
    k = m.sum(1)
    t = a.sort(1, descending=True).values.gather(1, (k - 1).clamp(min=0)[:, None])
    above, tie = a > t, a == t
    f64 = torch.float64
    spare = (k - above.sum(1)).to(f64)  # slots left for the values tied at t
    hits = (above & m).sum(1).to(f64) + spare * (tie & m).sum(1).to(f64) / tie.sum(1).clamp(min=1).to(f64)
    return _nan_where_empty(hits / k.clamp(min=1).to(f64), m)


def auroc_localisation(attr: Mask, mask: Mask, valid: Mask | None = None) -> Tensor:
    """Pixel AUROC of ``attr`` as a score for ``mask`` (Quantus ``AUC``), with midranks for ties.

    Mann-Whitney: ``(sum of the positives' midranks - P (P + 1) / 2) / (P N)``; equal to the trapezoid
    area under sklearn's ROC curve. NaN when the mask is all 0 or all 1 (of the valid pixels). Invalid
    pixels are placed at -inf, below every valid one, and their ranks taken off the positives'.
    """
    a, m, v = _flatten(attr, mask, valid)
    n_invalid = (~v).sum(1).to(torch.float64)
    a = _floor_invalid(a, v)
    s, perm = a.sort(1)
    n_all = s.shape[1]
    pos = torch.arange(n_all, device=s.device).expand_as(s)
    new = torch.ones_like(s, dtype=torch.bool)  # sorted position starts a group of equal values
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(1).values
    end = torch.ones_like(new)  # sorted position ends a group
    end[:, :-1] = new[:, 1:]
    last = torch.where(end, pos, torch.full_like(pos, n_all)).flip(1).cummin(1).values.flip(1)
    ranks = (first + last + 2).to(torch.float64) / 2  # midrank (1-based) of each sorted position
    ms = m.gather(1, perm)
    p = m.sum(1).to(torch.float64)
    n = v.sum(1).to(torch.float64) - p
    auc = ((ranks * ms).sum(1) - n_invalid * p - p * (p + 1) / 2) / (p * n)
    return torch.where((p > 0) & (n > 0), auc, torch.full_like(auc, float("nan")))
