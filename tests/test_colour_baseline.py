"""Tests of the colour-only baseline (scripts/colour_baseline.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from skimage.color import rgb2hed

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def cb(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import colour_baseline

    return colour_baseline


def test_fit_logistic_is_the_maximum_likelihood_fit(cb) -> None:
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (20_000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    w_true, b_true = np.array([1.5, -1.0, 2.0]), 0.3
    y = rng.random(len(x)) < 1 / (1 + np.exp(-(x @ w_true + b_true)))
    w, mean, std = cb.fit_logistic(x, y, l2=0.0, balanced=False)
    raw = np.r_[w[:3] / std, w[3] - (w[:3] / std) @ mean]  # back to raw feature units

    def nll(v: np.ndarray) -> float:
        z = x @ v[:3] + v[3]
        return float(np.sum(np.logaddexp(0, z) - y * z))

    ref = minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-8}).x
    np.testing.assert_allclose(raw, ref, atol=1e-4)
    np.testing.assert_allclose(raw, np.r_[w_true, b_true], atol=0.15)  # and near the truth


def test_balanced_weights_ignore_the_class_ratio(cb) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (5000, 2))
    y = rng.random(5000) < 0.1  # features carry nothing; 10% positive
    model = cb.fit_logistic(x, y)
    p = cb.predict_logistic(model, x)
    assert abs(p.mean() - 0.5) < 0.02  # not pulled towards the majority
    s = cb.scores(p, y)
    assert abs(s["balanced_accuracy"] - 0.5) < 0.05 and abs(s["auroc"] - 0.5) < 0.06


def test_patch_features_and_scores(cb) -> None:
    colours = np.array([[200, 120, 180], [90, 60, 140]], np.uint8)
    imgs = np.broadcast_to(colours[:, None, None, :], (2, 8, 8, 3)).copy()
    f = cb.patch_features(imgs)
    np.testing.assert_allclose(f[:, :3], colours / 255)
    np.testing.assert_allclose(f[:, 3:], rgb2hed(colours[None])[0], rtol=1e-6)
    s = cb.scores(np.array([0.9, 0.2, 0.6, 0.4]), np.array([1, 0, 0, 0]))
    assert s == {"accuracy": 0.75, "balanced_accuracy": (1 + 2 / 3) / 2, "auroc": 1.0}


def test_main_on_the_easy_cohort(cb, tiny_cohort, tiny_checkpoint, tmp_path, capsys) -> None:
    """On the easy preset colour separates the classes: the baseline says so, next to the model."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cohort))
    assert (
        cb.main(["--config", str(config), "--test-splits", "val", "test", "--model", str(tiny_checkpoint)])
        == 0
    )
    out = capsys.readouterr().out
    rows = {
        m[0].strip(): [float(v) for v in m[1:]]
        for m in re.findall(r"^(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    }
    assert rows["majority class"][1:] == [0.5, 0.5]
    assert rows["colour (held out)"][2] > 0.9  # AUROC: the easy lesion is a dark region
    model = [v for k, v in rows.items() if k.endswith("best.pt (held out)")]
    assert len(model) == 1 and all(0 <= v <= 1 for v in model[0])
    assert not any(math.isnan(v) for v in rows["colour (held out)"])
