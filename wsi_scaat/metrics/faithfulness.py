"""Faithfulness of saliency maps: deletion / insertion AUC and ROAD, batched in torch.

Common conventions:

* ``x``: images (B, C, H, W) as the model takes them (here [0, 1] RGB); ``attr``: (B, h, w) or
  (B, C', h, w) attributions. A (B, C', h, w) map is summed over channels to one score per pixel, and
  pixels are removed in all channels at once. A map coarser than the image (the saliency store keeps
  ``map_size`` < patch size) is ranked cell by cell and each cell covers its nearest-neighbour block of
  image pixels; removal fractions are fractions of cells.
* Order: MoRF (most relevant first) ranks by descending ``attr``, LeRF by ascending; ties are broken by
  position (stable sort).
* The score is the softmax probability of ``target`` (a (B,) int tensor). The model (an ``nn.Module``
  returning logits, on ``x``'s device) runs under ``torch.no_grad()`` in eval mode (its modules'
  training flags are restored afterwards), ``batch_size`` images per forward pass; memory is bounded by
  ``batch_size`` images whatever B.
* Curves are evaluated at removal fractions ``k / steps`` (``floor(k n / steps)`` of the n cells,
  k = 0..steps), and AUCs are the trapezoid area over the fraction in [0, 1], so in [0, 1].

Deletion (Petsiuk et al. 2018, RISE): replace the top cells of ``x`` by the baseline; a faithful map
makes the probability drop fast (low AUC). Insertion: start from the baseline and put back the top cells
of ``x``; high AUC is good. The baseline is ``make_baseline`` of the saliency code (shared with
integrated gradients): default ``"blur"``, a Gaussian blur of the image (sigma ``max(H, W) / 10`` px, or
``blur_sigma``), which keeps the tissue colours; also ``"black"`` (0), ``"white"`` (1), ``"mean"`` (each
image's per-channel mean), a float or a tensor broadcastable to ``x``.

ROAD (Rong et al. 2022, "remove and debias"): removed pixels are filled by *noisy linear imputation*,
each the weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal, renormalised at the border) solved
jointly as a sparse linear system, plus N(0, ``noise``^2) Gaussian noise, so the removal shape leaks
less class information than a constant fill.

Relation to Quantus 0.6: ``PixelFlipping(features_in_step=n // steps, perturb_baseline=b)`` with
``softmax=True`` gives ``deletion_curve(..., steps, baseline=b)[:, 1:]`` for one-channel inputs (Quantus
ranks each channel value separately, so it differs for C > 1; its AUC is an unnormalised ``np.trapz``
without the 0 point, and its ``"black"`` is the image minimum, ours 0). Quantus ``ROAD(percentages=[100 p])``
returns, per percentage, the batch mean of ``road(..., score="correct")`` (its ROAD is MoRF only, and
fails for C > 1 inputs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn

from wsi_scaat.metrics.complexity import as_tensor
from wsi_scaat.saliency.mask_opt import make_baseline

__all__ = [
    "DEFAULT_PERCENTAGES",
    "deletion_auc",
    "deletion_curve",
    "eval_mode",
    "insertion_auc",
    "insertion_curve",
    "noisy_linear_imputation",
    "road",
    "road_auc",
]

Baseline = str | float | Tensor
Order = Literal["morf", "lerf"]
Score = Literal["probability", "correct"]
Solver = Literal["auto", "spsolve", "cg"]

DEFAULT_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# Neighbour offsets (dy, dx) and weights of the ROAD imputation (Rong et al. 2022; as Quantus).
_OFFSETS: tuple[tuple[int, int, float], ...] = (
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
    (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12),
)  # fmt: skip


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``torch.no_grad()``; every module's training flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes:
            m.training = training


def _inputs(x: Tensor | np.ndarray, attr: Tensor | np.ndarray, target: Tensor | np.ndarray | None = None):
    """Images (B, C, H, W) float, pixel scores (B, h, w) float64 and targets (B,) long, on x's device."""
    x = as_tensor(x)
    if not x.is_floating_point():
        x = x.float()
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    a = as_tensor(attr, torch.float64).to(x.device)
    if a.ndim == 4:
        a = a.sum(1)
    if a.ndim != 3 or a.shape[0] != x.shape[0]:
        raise ValueError(f"attributions must be (B, [C,] h, w) with B = {x.shape[0]}, got {tuple(a.shape)}")
    t = None
    if target is not None:
        t = as_tensor(target).to(x.device).long().reshape(-1)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"target must be (B,) with B = {x.shape[0]}, got {tuple(t.shape)}")
    return x, a, t


def _ranks(scores: Tensor, order: str) -> Tensor:
    """Rank (0 = removed first) of every cell of (b, h, w) ``scores``, as (b, h, w) long."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    flat = scores.reshape(scores.shape[0], -1)
    idx = torch.argsort(-flat if order == "morf" else flat, dim=1, stable=True)
    ranks = torch.empty_like(idx)
    ranks.scatter_(1, idx, torch.arange(flat.shape[1], device=flat.device).expand_as(idx))
    return ranks.reshape(scores.shape)


def _pixel_mask(ranks: Tensor, count: int, size: tuple[int, int]) -> Tensor:
    """(b, 1, H, W) bool: the image pixels of the ``count`` first-ranked cells."""
    m = (ranks < count)[:, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m.to(torch.float32), size=size, mode="nearest") > 0.5
    return m


def _score(model: nn.Module, x: Tensor, target: Tensor, score: str) -> Tensor:
    """Softmax probability of ``target`` (or 1.0 where the argmax equals it), float64 (b,)."""
    logits = model(x)
    if score == "correct":
        return (logits.argmax(1) == target).to(torch.float64)
    return logits.to(torch.float64).softmax(1).gather(1, target[:, None])[:, 0]


def _check_score(score: str) -> None:
    if score not in ("probability", "correct"):
        raise ValueError(f"score must be 'probability' or 'correct', got {score!r}")


def _curve(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    steps: int,
    baseline: Baseline,
    batch_size: int,
    blur_sigma: float | None,
    insertion: bool,
    score: str,
) -> Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_score(score)
    x, a, t = _inputs(x, attr, target)
    n = a.shape[1] * a.shape[2]
    counts = [k * n // steps for k in range(steps + 1)]
    out = torch.empty(x.shape[0], steps + 1, dtype=torch.float64, device=x.device)
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb, tb = x[i : i + batch_size], t[i : i + batch_size]
            base = make_baseline(xb, baseline, blur_sigma)
            ranks = _ranks(a[i : i + batch_size], "morf")
            for k, count in enumerate(counts):
                m = _pixel_mask(ranks, count, x.shape[-2:])
                xk = torch.where(m, xb, base) if insertion else torch.where(m, base, xb)
                out[i : i + batch_size, k] = _score(model, xk, tb, score)
    return out


def _auc(curve: Tensor) -> Tensor:
    steps = curve.shape[1] - 1
    return torch.trapezoid(curve, dx=1.0 / steps, dim=1)


def deletion_curve(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    steps: int = 16,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    blur_sigma: float | None = None,
    score: Score = "probability",
) -> Tensor:
    """Probability of ``target`` after replacing the top ``k / steps`` of cells by the baseline (MoRF).

    (B, steps + 1) float64; column 0 is the intact image, the last the full baseline.
    ``score="correct"``: 1.0 where the argmax is ``target`` instead of the probability.
    """
    return _curve(model, x, attr, target, steps, baseline, batch_size, blur_sigma, False, score)


def deletion_auc(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    steps: int = 16,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    blur_sigma: float | None = None,
    score: Score = "probability",
) -> Tensor:
    """Area under :func:`deletion_curve` over the fraction removed in [0, 1], (B,) float64; low = good."""
    return _auc(deletion_curve(model, x, attr, target, steps, baseline, batch_size, blur_sigma, score))


def insertion_curve(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    steps: int = 16,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    blur_sigma: float | None = None,
    score: Score = "probability",
) -> Tensor:
    """Probability of ``target`` on the baseline with the top ``k / steps`` of cells of ``x`` put back (MoRF).

    (B, steps + 1) float64; column 0 is the full baseline, the last the intact image.
    """
    return _curve(model, x, attr, target, steps, baseline, batch_size, blur_sigma, True, score)


def insertion_auc(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    steps: int = 16,
    baseline: Baseline = "blur",
    batch_size: int = 64,
    blur_sigma: float | None = None,
    score: Score = "probability",
) -> Tensor:
    """Area under :func:`insertion_curve` over the fraction put back in [0, 1], (B,) float64; high = good."""
    return _auc(insertion_curve(model, x, attr, target, steps, baseline, batch_size, blur_sigma, score))


# ---------------------------------------------------------------------------------------------------
# Noisy linear imputation


def _impute_spsolve(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Linear imputation of one (C, H, W) float64 image at the ``removed`` (H, W) pixels: one sparse solve."""
    c, h, w = img.shape
    u = np.flatnonzero(removed)
    if u.size == 0:
        return img
    var = np.full(h * w, -1, dtype=np.int64)
    var[u] = np.arange(u.size)
    r, col = np.divmod(u, w)
    flat = img.reshape(c, -1)
    diag = np.zeros(u.size)
    rhs = np.zeros((u.size, c))
    rows, cols, vals = [], [], []
    for dy, dx, wt in _OFFSETS:
        rr, cc = r + dy, col + dx
        ok = np.flatnonzero((rr >= 0) & (rr < h) & (cc >= 0) & (cc < w))
        nb = rr[ok] * w + cc[ok]
        diag[ok] += wt
        unknown = var[nb] >= 0
        rows.append(ok[unknown])
        cols.append(var[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        rhs[ok[~unknown]] += wt * flat[:, nb[~unknown]].T  # ``ok`` has no repeats: fancy += is safe
    ids = np.arange(u.size)
    a = coo_matrix(
        (np.concatenate([*vals, diag]), (np.concatenate([*rows, ids]), np.concatenate([*cols, ids]))),
        shape=(u.size, u.size),
    ).tocsc()
    sol = spsolve(a, rhs).reshape(u.size, c)
    out = flat.copy()
    out[:, u] = sol.T
    return out.reshape(c, h, w)


def _impute_cg(x: Tensor, removed: Tensor, tol: float = 1e-6, max_iter: int | None = None) -> Tensor:
    """The same imputation for a batch (b, C, H, W) by Jacobi-preconditioned conjugate gradients in torch.

    The system (diagonal = border-renormalised weight sum, off-diagonal = -neighbour weight) is symmetric
    positive definite when some pixel is known, so CG converges; it stops when every residual is below
    ``tol`` times its right-hand side's norm. float64 throughout; the stencil is 8 shifted slices.
    """
    b_, c, h, w = x.shape
    dtype = torch.float64

    def conv(v: Tensor) -> Tensor:  # weighted sum of the 8 neighbours, zero outside the image
        pad = F.pad(v, (1, 1, 1, 1))
        return sum(wt * pad[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx, wt in _OFFSETS)

    m = removed.to(dtype).expand(b_, c, h, w)
    xd = x.to(dtype)
    s = conv(torch.ones(1, 1, h, w, dtype=dtype, device=x.device))
    rhs = m * conv(xd * (1 - m))
    inv_s = m / s

    def apply(v: Tensor) -> Tensor:
        return m * (s * v - conv(v))

    v = torch.zeros_like(xd)
    r = rhs.clone()
    z = inv_s * r
    p = z.clone()
    rz = (r * z).sum((2, 3), keepdim=True)
    stop = (tol * rhs.norm(dim=(2, 3), keepdim=True)).clamp(min=1e-30)
    for _ in range(max_iter or 10 * (h + w)):
        if bool((r.norm(dim=(2, 3), keepdim=True) <= stop).all()):
            break
        ap = apply(p)
        alpha = rz / (p * ap).sum((2, 3), keepdim=True).clamp(min=1e-300)
        v = v + alpha * p
        r = r - alpha * ap
        z = inv_s * r
        rz_new = (r * z).sum((2, 3), keepdim=True)
        p = z + rz_new / rz.clamp(min=1e-300) * p
        rz = rz_new
    return torch.where(m > 0, v, xd).to(x.dtype)


def noisy_linear_imputation(
    x: Tensor,
    removed: Tensor,
    noise: float = 0.01,
    seeds: Sequence[int | Sequence[int]] | None = None,
    solver: Solver = "auto",
) -> Tensor:
    """``x`` (B, C, H, W) with the ``removed`` (B, H, W) or (B, 1, H, W) pixels linearly imputed, plus noise.

    Each removed pixel becomes the weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal, weights
    renormalised at the image border), all removed pixels solved jointly; then N(0, ``noise``^2) is added
    to them. ``seeds``: one noise seed (an int or a tuple of ints) per image, for numpy
    ``default_rng(seed)``, so the noise does not depend on the device or batching; default ``range(B)``.
    ``solver``: ``"spsolve"`` (scipy sparse LU per image, exact, as Quantus), ``"cg"`` (batched
    conjugate gradients in torch, relative residual 1e-6), ``"auto"`` (``"cg"`` on a GPU, else
    ``"spsolve"``). Removing every pixel of an image is an error.
    """
    if solver == "auto":
        solver = "spsolve" if x.device.type == "cpu" else "cg"
    if solver not in ("spsolve", "cg"):
        raise ValueError(f"solver must be 'auto', 'spsolve' or 'cg', got {solver!r}")
    rem = removed.reshape(x.shape[0], 1, *x.shape[-2:]).to(x.device, torch.bool)
    if bool(rem.reshape(x.shape[0], -1).all(1).any()):
        raise ValueError("cannot impute an image with every pixel removed")
    if solver == "cg":
        out = _impute_cg(x, rem)
    else:
        xs = x.detach().cpu().to(torch.float64).numpy()
        rs = rem[:, 0].cpu().numpy()
        out = torch.from_numpy(np.stack([_impute_spsolve(img, r) for img, r in zip(xs, rs, strict=True)]))
        out = out.to(device=x.device, dtype=x.dtype)
    if noise:
        seeds = range(x.shape[0]) if seeds is None else seeds
        draws = [np.random.default_rng(list(np.atleast_1d(s))).standard_normal(x.shape[1:]) for s in seeds]
        eps = np.stack(draws)
        out = out + noise * rem * torch.from_numpy(eps).to(device=x.device, dtype=x.dtype)
    return out


def road(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    order: Order = "morf",
    noise: float = 0.01,
    seed: int = 0,
    score: Score = "probability",
    batch_size: int = 64,
    solver: Solver = "auto",
) -> Tensor:
    """ROAD: score of ``target`` after removing each fraction of cells and imputing them, (B, P) float64.

    ``percentages``: fractions in [0, 1) of the cells removed (``floor(p n)`` cells), in ``order``
    (``"morf"``: most relevant first; ``"lerf"``: least relevant first). Removed pixels are filled by
    :func:`noisy_linear_imputation` (noise std ``noise``; the noise of image i at fraction j is seeded by
    ``(seed, i, j)``, so results do not depend on ``batch_size`` or the device). ``score``:
    ``"probability"`` (softmax of ``target``) or ``"correct"`` (1.0 where the argmax is ``target``, as
    Quantus: the batch mean is the accuracy curve of Rong et al.).

    A faithful map makes MoRF fall fast and LeRF stay high; :func:`road_auc` reduces a curve to one
    number, and ``road_auc(order="lerf") - road_auc(order="morf")`` summarises both.
    """
    _check_score(score)
    fracs = [float(p) for p in percentages]
    if not fracs or any(not 0 <= p < 1 for p in fracs):
        raise ValueError(f"percentages must be fractions in [0, 1), got {percentages}")
    x, a, t = _inputs(x, attr, target)
    n = a.shape[1] * a.shape[2]
    counts = [int(np.floor(p * n + 1e-9)) for p in fracs]
    out = torch.empty(x.shape[0], len(fracs), dtype=torch.float64, device=x.device)
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb, tb = x[i : i + batch_size], t[i : i + batch_size]
            ranks = _ranks(a[i : i + batch_size], order)
            for j, count in enumerate(counts):
                m = _pixel_mask(ranks, count, x.shape[-2:])
                seeds = [(seed, i + q, j) for q in range(len(xb))]
                xk = noisy_linear_imputation(xb, m, noise=noise, seeds=seeds, solver=solver)
                out[i : i + batch_size, j] = _score(model, xk, tb, score)
    return out


def road_auc(
    model: nn.Module,
    x: Tensor | np.ndarray,
    attr: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    order: Order = "morf",
    noise: float = 0.01,
    seed: int = 0,
    score: Score = "probability",
    batch_size: int = 64,
    solver: Solver = "auto",
) -> Tensor:
    """Mean height of the :func:`road` curve: trapezoid area over ``percentages`` / their span, (B,).

    In [0, 1]; with one percentage, that point. Lower is better for MoRF, higher for LeRF.
    """
    curve = road(model, x, attr, target, percentages, order, noise, seed, score, batch_size, solver)
    p = torch.tensor([float(q) for q in percentages], dtype=torch.float64, device=curve.device)
    if len(p) == 1 or float(p.max() - p.min()) == 0:
        return curve.mean(1)
    order_p = p.argsort()
    return torch.trapezoid(curve[:, order_p], p[order_p], dim=1) / (p.max() - p.min())
