"""What a heatmap pixel means (``stitch.value``): each patch's per-pixel value before blending.

- ``saliency``: |attribution| summed over colour channels (the store's ``maps``);
- ``evidence``: the positive part of the attribution summed over colour channels (``signed``): the
  pixels whose attribution speaks for the target class (for ``gradient``: where brightening raises
  its logit; for ``grad_x_input`` and ``integrated_gradients``: the contribution's sign);
- ``weighted``: ``saliency`` times the patch's probability of the target class, so that tissue the
  model calls normal stays dark;
- ``probability``: the patch's probability of the target class, the same over its footprint: the
  baseline a saliency heatmap must beat.

The first three are normalised per slide by percentiles of their saliency factor (``maps``, or the
positive part of ``signed``) over the store's patches, so ``weighted`` keeps the scale of
``saliency`` and is dark where p is low; ``probability`` is not normalised (already in [0, 1]).
"""

from __future__ import annotations

import numpy as np

VALUES = ("saliency", "evidence", "weighted", "probability")
F16_MAX = float(np.finfo(np.float16).max)


def check_value(value: str) -> str:
    """``value`` if it is one of :data:`VALUES`, else ``ValueError``."""
    if value not in VALUES:
        raise ValueError(f"heatmap value must be one of {VALUES}, not {value!r}")
    return value


def source_array(value: str) -> str | None:
    """The saliency-store array a value is computed from (None: probabilities only)."""
    sources = {"saliency": "maps", "evidence": "signed", "weighted": "maps", "probability": None}
    return sources[check_value(value)]


def uses_probability(value: str) -> bool:
    """Whether the value needs each patch's probability of the target class."""
    return check_value(value) in ("weighted", "probability")


def normalised(value: str) -> bool:
    """Whether the heatmap of this value is normalised per slide (all but ``probability``)."""
    return check_value(value) != "probability"


def factor(value: str, raw: np.ndarray) -> np.ndarray:
    """The saliency factor of raw ``source_array`` values (float32): what the percentiles are taken of."""
    v = np.asarray(raw, dtype=np.float32)
    return np.maximum(v, 0) if value == "evidence" else v


def pixel_values(value: str, raw: np.ndarray | None, prob: np.ndarray | None, map_size: int) -> np.ndarray:
    """(n, m, m) float64 per-pixel values of ``n`` patches: ``raw`` (n, m, m) from :func:`source_array`
    (non-finite read as 0 for NaN, +-float16 max for inf), ``prob`` (n,) of the target class."""
    if value == "probability":
        p = np.asarray(prob, dtype=np.float64)
        return np.broadcast_to(p[:, None, None], (len(p), map_size, map_size)).copy()
    v = np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0, posinf=F16_MAX, neginf=-F16_MAX)
    if value == "evidence":
        np.maximum(v, 0.0, out=v)
    elif value == "weighted":
        v *= np.asarray(prob, dtype=np.float64)[:, None, None]
    return v


def meaning(value: str, target: str) -> str:
    """What the colour means, for legends: e.g. "lesion evidence (attribution > 0)"."""
    t = "predicted-class" if target == "predicted" else str(target)
    p = "p(predicted class)" if target == "predicted" else f"p({target})"
    return {
        "saliency": f"{t} saliency (|attribution|)",
        "evidence": f"{t} evidence (attribution > 0)",
        "weighted": f"{t} saliency x {p}",
        "probability": p,
    }[check_value(value)]
