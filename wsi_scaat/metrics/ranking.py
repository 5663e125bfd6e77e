"""Rank-based AUROC (Mann-Whitney U with midranks for ties), for classifiers and pixel maps."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``; NaN if one class is absent.

    For multi-class scores (N, K) and labels in 0..K-1, the macro average of one-vs-rest AUROCs
    over the classes present.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).ravel()
    if scores.ndim == 2:
        if scores.shape[1] == 2:
            return auroc(scores[:, 1], labels == 1)
        values = [auroc(scores[:, k], labels == k) for k in range(scores.shape[1])]
        values = [v for v in values if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")
    scores = scores.ravel()
    positive = labels.astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
