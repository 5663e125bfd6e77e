"""Reconstruction check of saliency maps (after Thakur & Fischmeister 2020).

Keep the top ``keep`` fraction of salient pixels of each patch, fill every other pixel from a *donor*:
another tissue patch of the same cohort, at the same positions, so the filler comes from the data
distribution rather than a constant. If the map found the evidence the model uses, the reconstruction
keeps the patch's predicted class; Thakur & Fischmeister report 89% of reconstructions keeping the
original class. The result is the fraction of patches whose class is unchanged, per ``keep`` fraction;
run it once per saliency method on the same patches and donors (same ``seed``: same donors) to compare.

Attributions follow :mod:`wsi_scaat.metrics.faithfulness`: (B, h, w) or (B, C', h, w) (summed over
channels), possibly coarser than the patches (each map cell covers its nearest-neighbour pixel block);
the top ``floor(keep * h * w)`` cells are kept, ties broken by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsi_scaat.metrics.complexity import as_tensor
from wsi_scaat.metrics.faithfulness import _inputs, _pixel_mask, _ranks, eval_mode

__all__ = ["ReconstructionResult", "pick_donors", "reconstruction_check"]


@dataclass(frozen=True)
class ReconstructionResult:
    """Outcome of :func:`reconstruction_check` for B patches and K ``keep`` fractions."""

    keep: tuple[float, ...]
    """The fractions of map cells kept, (K,)."""
    fraction_unchanged: Tensor
    """(K,) float64: fraction of patches whose reconstruction is predicted as ``reference``."""
    unchanged: Tensor
    """(B, K) bool: per patch and fraction, the reconstruction's class equals ``reference``."""
    reference: Tensor
    """(B,) long: ``target`` if given, else the class predicted on the intact patch."""
    predicted: Tensor
    """(B, K) long: the class predicted on each reconstruction."""
    donor: Tensor
    """(B,) long: index into ``donors`` of each patch's donor."""

    @property
    def kept(self) -> Tensor:
        """Per-patch "class kept" booleans: (B,) for one ``keep`` fraction, else (B, K) (``unchanged``)."""
        return self.unchanged[:, 0] if len(self.keep) == 1 else self.unchanged

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python summary: ``{"n": B, "keep": [...], "fraction_unchanged": [...]}``."""
        return {
            "n": int(self.unchanged.shape[0]),
            "keep": list(self.keep),
            "fraction_unchanged": [float(v) for v in self.fraction_unchanged],
        }


def pick_donors(x: Tensor, donors: Tensor, seed: int = 0, chunk: int = 256) -> Tensor:
    """One donor index per patch of ``x``, uniform over the donors not identical to that patch, (B,) long.

    Seeded (``torch.Generator``, independent of the device); identical donors (e.g. the patch itself)
    are redrawn, and after a few rounds the remaining patches choose among all non-identical donors.
    Raises ``ValueError`` if a patch has no non-identical donor.
    """
    b, n = x.shape[0], donors.shape[0]
    if n == 0:
        raise ValueError("no donor patches")
    if tuple(donors.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"donors must be (N, {', '.join(map(str, x.shape[1:]))}), got {tuple(donors.shape)}")
    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(n, (b,), generator=g)

    def identical(rows: Tensor, idx: Tensor) -> Tensor:
        out = torch.zeros(len(rows), dtype=torch.bool)
        for s in range(0, len(rows), chunk):
            xr = x[rows[s : s + chunk].to(x.device)]
            dr = donors[idx[s : s + chunk].to(donors.device)].to(xr.device)
            out[s : s + chunk] = (xr.flatten(1) == dr.flatten(1)).all(1).cpu()
        return out

    rows = torch.arange(b)
    for _ in range(8):
        rows = rows[identical(rows, choice[rows])]
        if len(rows) == 0:
            return choice
        choice[rows] = torch.randint(n, (len(rows),), generator=g)
    rows = rows[identical(rows, choice[rows])]
    for r in rows.tolist():  # rare: many duplicates of this patch among the donors
        ok = ~identical(torch.full((n,), r), torch.arange(n))
        if not bool(ok.any()):
            raise ValueError(f"patch {r} has no donor that differs from it")
        cand = torch.nonzero(ok)[:, 0]
        choice[r] = cand[torch.randint(len(cand), (1,), generator=g)]
    return choice


def reconstruction_check(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    donors: Tensor | np.ndarray,
    keep: float | Sequence[float] = 0.1,
    target: Tensor | np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> ReconstructionResult:
    """Fraction of patches whose class survives keeping only their top-``keep`` salient pixels.

    ``x`` (B, C, H, W) patches as the model takes them, ``attr`` their maps, ``donors`` (N, C, H, W)
    other tissue patches of the same cohort (e.g. a random sample of the cohort's patch store; on any
    device, moved per chunk). Each patch gets one donor (:func:`pick_donors`, seeded by ``seed``,
    never a patch identical to it) used for every ``keep`` fraction; the reconstruction is
    ``where(kept, x, donor)``. ``target``: the class to compare with (e.g. the class the map explains);
    default the class predicted on the intact patch. The model runs in eval mode under no_grad,
    ``batch_size`` patches per forward pass.
    """
    keeps = (float(keep),) if isinstance(keep, (int, float)) else tuple(float(k) for k in keep)
    if not keeps or any(not 0 <= k <= 1 for k in keeps):
        raise ValueError(f"keep must be fractions in [0, 1], got {keep}")
    x, a, t = _inputs(x, attr, target)
    d = as_tensor(donors)
    donor = pick_donors(x, d, seed)
    n = a.shape[1] * a.shape[2]
    counts = [int(np.floor(k * n + 1e-9)) for k in keeps]
    b = x.shape[0]
    predicted = torch.empty(b, len(keeps), dtype=torch.long)
    reference = torch.empty(b, dtype=torch.long)
    with eval_mode(model):
        for i in range(0, b, batch_size):
            xb = x[i : i + batch_size]
            db = d[donor[i : i + batch_size].to(d.device)].to(device=x.device, dtype=x.dtype)
            pred = model(xb).argmax(1)
            reference[i : i + batch_size] = (pred if t is None else t[i : i + batch_size]).cpu()
            ranks = _ranks(a[i : i + batch_size], "morf")
            for j, count in enumerate(counts):
                kept = _pixel_mask(ranks, count, x.shape[-2:])
                predicted[i : i + batch_size, j] = model(torch.where(kept, xb, db)).argmax(1).cpu()
    unchanged = predicted == reference[:, None]
    return ReconstructionResult(
        keep=keeps,
        fraction_unchanged=unchanged.to(torch.float64).mean(0),
        unchanged=unchanged,
        reference=reference,
        predicted=predicted,
        donor=donor,
    )
