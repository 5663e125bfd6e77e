"""Throughput of the batched saliency metrics (``wsi_scaat.metrics``) vs Quantus on the same inputs.

    python benchmarks/bench_metrics.py [--quick] [--threads 1]

Random maps (B = 256, 64 x 64; ``--quick``: B = 64, 32 x 32; signed, and their absolute values for
localisation) with random binary masks for the complexity and localisation metrics (no model).
Faithfulness: one-channel 64 x 64 images and a small CNN (the definitions only coincide for one
channel: Quantus's ROAD fails for C > 1 and its pixel flipping ranks channel values separately):
deletion curve with 16 steps and a constant baseline vs Quantus ``PixelFlipping(features_in_step=n
/ 16)``, and ROAD (noise 0, 5 fractions, fewer maps: one sparse solve per map and fraction) vs Quantus
``ROAD``. Everything runs on the CPU, by default with one torch thread (``--threads``; numpy/Quantus
is single-threaded), so the ratio compares the implementations rather than core counts, and a shared
machine does not stall torch's thread pool. "speed-up" is Quantus's time over ours; "max diff"
compares the two results, ``|ours - quantus| / max(1, |quantus|)`` (the deletion curves; ROAD's
accuracy per fraction; one value per map otherwise). Ours is the best of 3 runs, Quantus's one run.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsi_scaat import metrics as M  # noqa: E402

from common import machine, table, timed  # noqa: E402

COLUMNS = ["metric", "maps", "map px", "ours maps/s", "quantus maps/s", "speed-up", "max diff"]


def small_cnn(seed: int = 0) -> nn.Module:
    """One input channel, two classes: 2 x (conv 3x3 stride 2, ReLU), global average pooling, linear."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2),
        )  # fmt: skip
    return net.eval()


def _quantus() -> Any:
    try:
        import quantus
    except ImportError:
        return None
    warnings.filterwarnings("ignore", module="quantus")
    return quantus


def run(quick: bool = False, threads: int | None = 1) -> list[dict[str, Any]]:
    """Time each metric, ours vs Quantus; one row per metric (Quantus columns empty without it).

    ``threads``: torch threads during the run (restored after); None keeps torch's setting.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(before)


def _run(quick: bool) -> list[dict[str, Any]]:
    q = _quantus()
    rng = np.random.default_rng(0)
    b, s = (64, 32) if quick else (256, 64)
    b_road = 8 if quick else 32
    a = rng.standard_normal((b, 1, s, s)).astype(np.float32)
    density = rng.uniform(0.05, 0.6, (b, 1, 1, 1))
    m = (rng.random((b, 1, s, s)) < density).astype(np.float32)
    x = rng.random((b, 1, s, s)).astype(np.float32)
    net = small_cnn()
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    pos = np.abs(a)  # localisation: non-negative maps, as the saliency store keeps (signed totals near 0
    # make the relevance mass ill-conditioned, and Quantus sums in float32)
    at, pt, mt = torch.from_numpy(a[:, 0]), torch.from_numpy(pos[:, 0]), torch.from_numpy(m[:, 0])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps, percents = 16, [10, 30, 50, 70, 90]
    base = {"model": None, "x_batch": x, "y_batch": y, "channel_first": True}

    def qcall(metric: Any, maps: np.ndarray = a, **kw: Any) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                args = {**base, "a_batch": maps.copy(), **kw}
                return np.asarray(metric(**args), dtype=np.float64)

        return call

    cases: list[tuple[str, int, Callable[[], Any], Callable[[], Any] | None, Callable[[Any], Any]]] = []
    per_map = lambda r: r.numpy()  # noqa: E731
    for name, ours, qname, kw in [
        ("sparseness_gini", lambda: M.sparseness_gini(at), "Sparseness", {}),
        ("complexity_entropy", lambda: M.complexity_entropy(at), "Complexity", {}),
        ("pointing_game", lambda: M.pointing_game(pt, mt), "PointingGame", {"s_batch": m, "maps": pos}),
        ("relevance_mass_accuracy", lambda: M.relevance_mass_accuracy(pt, mt), "RelevanceMassAccuracy",
         {"s_batch": m, "maps": pos}),
        ("relevance_rank_accuracy", lambda: M.relevance_rank_accuracy(pt, mt), "RelevanceRankAccuracy",
         {"s_batch": m, "maps": pos}),
        ("auroc_localisation", lambda: M.auroc_localisation(pt, mt), "AUC", {"s_batch": m, "maps": pos}),
    ]:  # fmt: skip
        qfn = qcall(getattr(q, qname)(disable_warnings=True), **kw) if q else None
        cases.append((name, b, ours, qfn, per_map))

    def ours_del() -> np.ndarray:
        return M.deletion_curve(net, xt, at, yt, steps=steps, baseline=0.0, batch_size=256)[:, 1:].numpy()

    qdel = None
    if q:
        pf = q.PixelFlipping(features_in_step=s * s // steps, perturb_baseline=0.0, disable_warnings=True)
        qdel = qcall(pf, model=net, softmax=True)
    cases.append((f"deletion_curve ({steps} steps)", b, ours_del, qdel, lambda r: r))

    xr, ar, yr = x[:b_road], a[:b_road], y[:b_road]

    def ours_road() -> np.ndarray:
        fr = [p / 100 for p in percents]
        return M.road(net, xr, ar[:, 0], yr, percentages=fr, noise=0.0, score="correct").mean(0).numpy()

    qroad = None
    if q:
        road = q.ROAD(percentages=percents, noise=0.0, disable_warnings=True)

        def qroad() -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = road(model=net, x_batch=xr, y_batch=yr, a_batch=ar.copy(), channel_first=True)
            return np.array([res[p] for p in percents])

    cases.append((f"road ({len(percents)} fractions)", b_road, ours_road, qroad, lambda r: r))

    rows = []
    for name, n, ours, qfn, comparable in cases:
        t_ours, r_ours = timed(ours, repeat=3)
        row: dict[str, Any] = {"metric": name, "maps": n, "map px": f"{s}x{s}", "ours maps/s": n / t_ours}
        if qfn is not None:
            t_q, r_q = timed(qfn)
            ref = np.asarray(r_q, dtype=np.float64)
            diff = np.nanmax(np.abs(comparable(r_ours) - ref) / np.maximum(1, np.abs(ref)))
            row.update({"quantus maps/s": n / t_q, "speed-up": t_q / t_ours, "max diff": f"{diff:.1e}"})
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller maps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    print(machine())
    q = _quantus()
    versions = f"quantus {q.__version__}" if q else "quantus not installed: our timings only"
    print(f"{versions}; torch threads: {args.threads or torch.get_num_threads()}\n", flush=True)
    print(table(run(args.quick, args.threads or None), COLUMNS))


if __name__ == "__main__":
    main()
