"""Colour-only baseline of a tiled cohort: can mean colour alone tell lesion from normal patches?

Fits a class-balanced logistic regression on six features per patch, the mean RGB and the mean
hematoxylin, eosin and DAB optical densities (skimage ``rgb2hed``), of the train-split patches
and reports its accuracy, balanced accuracy and AUROC on the held-out split, next to the
majority-class rate and, with ``--model``, the same figures of trained checkpoints on the same
patches. The cohort must be tiled with annotations (the stores hold ``labels``).

    python scripts/colour_baseline.py --config configs/demo.yaml --config configs/hard.yaml \\
        --model results/hard/models/erm/best.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.color import rgb2hed

FEATURES = ("R", "G", "B", "H", "E", "D")


def patch_features(imgs: np.ndarray) -> np.ndarray:
    """(N, 6) float64: mean R, G, B in [0, 1] and mean H, E, D optical density of (N, P, P, 3) uint8."""
    imgs = np.asarray(imgs)
    rgb = imgs.reshape(len(imgs), -1, 3).mean(1) / 255.0
    hed = rgb2hed(imgs.reshape(-1, imgs.shape[2], 3)).reshape(len(imgs), -1, 3).mean(1)
    return np.concatenate([rgb, hed], axis=1)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1e-3, balanced: bool = True, iterations: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logistic regression by Newton's method on standardised features.

    Returns (weights with the intercept last, feature means, feature stds). ``balanced`` weighs each
    class by the inverse of its frequency, as the patch classifiers' training balances classes.
    """
    y = np.asarray(y, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-12
    a = np.c_[(x - mean) / std, np.ones(len(x))]
    sw = np.ones(len(y))
    if balanced:
        pos = y.mean()
        if 0 < pos < 1:
            sw = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    w = np.zeros(a.shape[1])
    reg = l2 * len(y) * np.r_[np.ones(a.shape[1] - 1), 0.0]
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(a @ w)))
        grad = a.T @ (sw * (p - y)) + reg * w
        hess = (a * (sw * p * (1 - p))[:, None]).T @ a + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w, mean, std


def predict_logistic(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Probability of the positive class of each row of ``x``."""
    w, mean, std = model
    return 1 / (1 + np.exp(-(np.c_[(x - mean) / std, np.ones(len(x))] @ w)))


def scores(prob: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy (threshold 0.5), balanced accuracy and AUROC of positive-class probabilities."""
    from wsi_scaat.metrics.ranking import auroc

    y = np.asarray(y).astype(bool)
    pred = np.asarray(prob) >= 0.5
    recalls = [float((pred[y == c] == c).mean()) for c in (False, True) if (y == c).any()]
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "auroc": auroc(prob, y),
    }


def load_split(stores: Sequence[Path], with_pixels: bool = True) -> tuple[np.ndarray, np.ndarray, list]:
    """Features (or None), labels and per-store patch counts of the patch stores ``stores``."""
    from wsi_scaat.store import open_store

    feats, labels, counts = [], [], []
    for path in stores:
        with open_store(path) as store:
            if "labels" not in store:
                raise SystemExit(f"{path}: no labels in the patch store; tile with the annotations")
            labels.append(store.array("labels"))
            counts.append(len(store))
            if with_pixels:
                for i in range(0, len(store), 1024):
                    feats.append(patch_features(store.imgs[i : i + 1024]))
    x = np.concatenate(feats) if feats else np.zeros((0, len(FEATURES)))
    return x, np.concatenate(labels) if labels else np.zeros(0, np.int64), counts


def model_probs(checkpoint: Path, stores: Sequence[Path], batch: int = 256) -> np.ndarray:
    """Lesion-class probability of every patch of ``stores`` under a trained checkpoint (CPU)."""
    import torch

    from wsi_scaat.saliency.stage import load_model
    from wsi_scaat.store import open_store

    model, state = load_model(checkpoint, torch.device("cpu"))
    k = list(state["class_names"]).index("lesion") if "lesion" in state["class_names"] else 1
    out = []
    with torch.no_grad():
        for path in stores:
            with open_store(path) as store:
                for i in range(0, len(store), batch):
                    x = torch.from_numpy(np.ascontiguousarray(store.imgs[i : i + batch])).permute(0, 3, 1, 2)
                    out.append(torch.softmax(model(x.float() / 255), 1)[:, k].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", type=Path, required=True, help="config(s), layered")
    parser.add_argument(
        "--train-splits", nargs="+", default=["train"], help="splits the baseline learns from"
    )
    parser.add_argument("--test-splits", nargs="+", default=["test"], help="held-out splits")
    parser.add_argument("--model", action="append", type=Path, default=[], help="checkpoint(s) to compare")
    args = parser.parse_args(argv)

    from wsi_scaat.config import load_config
    from wsi_scaat.data.dataset import cohort_stores

    cfg = load_config(*args.config)
    splits = list(dict.fromkeys([*args.train_splits, *args.test_splits]))
    stores = cohort_stores(cfg.cohort.manifest, cfg.results / "tiles", cfg.tiling.format, splits)
    train = [p for s in args.train_splits for p, _ in stores[s]]
    test = [p for s in args.test_splits for p, _ in stores[s]]
    x_tr, y_tr, _ = load_split(train)
    x_te, y_te, counts = load_split(test)
    if len(np.unique(y_tr)) < 2:
        raise SystemExit("the train patches hold one class only")
    model = fit_logistic(x_tr, y_tr)
    rows = [
        (
            "majority class",
            {"accuracy": max(y_te.mean(), 1 - y_te.mean()), "balanced_accuracy": 0.5, "auroc": 0.5},
        )
    ]
    rows.append(("colour (train fit)", scores(predict_logistic(model, x_tr), y_tr)))
    rows.append(("colour (held out)", scores(predict_logistic(model, x_te), y_te)))
    for ckpt in args.model:
        rows.append((f"{ckpt} (held out)", scores(model_probs(ckpt, test), y_te)))
    print(
        f"cohort {cfg.cohort.name}: train {len(y_tr)} patches ({y_tr.mean():.1%} lesion) of {len(train)} "
        f"slides; held out ({', '.join(args.test_splits)}) {len(y_te)} patches ({y_te.mean():.1%} lesion) "
        f"of {len(test)} slides"
    )
    by_class = {c: x_te[y_te == c].mean(0) for c in (0, 1) if (y_te == c).any()}
    for c, m in by_class.items():
        print(
            f"held-out mean features of class {c}: "
            + " ".join(f"{n}={v:.4f}" for n, v in zip(FEATURES, m, strict=True))
        )
    print(f"{'classifier':<48} {'accuracy':>9} {'bal. acc.':>9} {'AUROC':>7}")
    for name, s in rows:
        print(f"{name:<48} {s['accuracy']:9.3f} {s['balanced_accuracy']:9.3f} {s['auroc']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
