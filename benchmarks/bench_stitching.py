"""Stitching throughput and memory: out-of-core ``stitch`` on a large slide, and vs a dense canvas.

    python benchmarks/bench_stitching.py [--size 100000] [--dense-size 20000] [--chunk 1024]
                                         [--tissue 0.6]

(1) A ``--size`` px square slide at 0.5 mpp, 256-px patches (patch_size_level0 256), 64-px maps:
heatmap ``size / 4`` px square. ``--tissue`` of the grid positions are tissue (a smooth random blob)
and carry a patch. ``stitch`` runs in a subprocess, so the peak RSS is the stitcher's alone.
(2) On a ``--dense-size`` slide: ``stitch`` (level 0 and the pyramid written to zarr) vs
``stitch_dense`` (one dense numpy canvas, same blending, normalisation, masking; nothing written),
each in its own subprocess.

The synthetic saliency stores are generated once, chunk by chunk, into benchmarks/.cache/.
Maps are a smooth global field times a random per-patch gain (float16).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, machine, peak_rss_mb, table  # noqa: E402

PATCH, MAP, MPP, TD = 256, 64, 0.5, 64


def tissue_blob(size: int, fraction: float, seed: int = 0) -> np.ndarray:
    """A smooth random tissue mask (TD level-0 px per pixel) covering about ``fraction`` of the slide."""
    from scipy.ndimage import zoom

    n = math.ceil(size / TD)
    coarse = np.random.default_rng(seed).random((6, 6))
    field = zoom(coarse, n / 6, order=3)[:n, :n]
    yy, xx = np.mgrid[0:n, 0:n] / n - 0.5
    field = field - 1.5 * (xx**2 + yy**2)  # tissue towards the centre
    return (field >= np.quantile(field, 1 - fraction)).astype(np.uint8)


def field_maps(coords: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth saliency maps: a global field sampled at each map pixel, times a per-patch gain."""
    step = PATCH / MAP
    offs = (np.arange(MAP) + 0.5) * step
    x = (coords[:, 0, None, None] + offs[None, None, :]).astype(np.float32)
    y = (coords[:, 1, None, None] + offs[None, :, None]).astype(np.float32)
    f = 1 + np.sin(x / 3100 + 1.3) * np.cos(y / 2300) + 0.5 * np.sin((x + 2 * y) / 610) ** 2
    gain = rng.uniform(0.6, 1.4, (len(coords), 1, 1)).astype(np.float32)
    return (f * gain).astype(np.float16)


def bench_store(size: int, tissue: float) -> Path:
    """The synthetic saliency store of a ``size`` px slide, generated chunk by chunk and cached."""
    from wsi_scaat.saliency.store import MAP_CHUNK, create_saliency_store

    path = CACHE / f"bench_stitch_{size}_{tissue:g}.saliency.zarr"
    if path.exists():
        return path
    t0 = time.perf_counter()
    mask = tissue_blob(size, tissue)
    ys, xs = np.mgrid[0:size:PATCH, 0:size:PATCH]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    centre = np.minimum((coords + PATCH // 2) // TD, mask.shape[0] - 1)
    coords = coords[mask[centre[:, 1], centre[:, 0]] == 1]
    n = len(coords)
    attrs = {"slide_id": path.name.split(".")[0], "source_path": "synthetic", "slide_width": size,
             "slide_height": size, "mpp_level0": MPP, "patch_size": PATCH, "patch_size_level0": PATCH,
             "map_size": MAP, "map_downsample": PATCH // MAP, "class_names": ["normal", "tumour"],
             "saliency_method": "synthetic", "saliency_target": "predicted",
             "tissue_downsample": TD}  # fmt: skip
    print(f"generating saliency store: {size} x {size} px slide, {n:,} patches -> {path}", flush=True)
    rng = np.random.default_rng(1)
    with create_saliency_store(path, n, 2, MAP, attrs) as writer:
        writer.write_array("coords", coords)
        writer.write_array("tissue_mask", mask)
        for s in range(0, n, MAP_CHUNK):
            c = coords[s : s + MAP_CHUNK]
            writer.write(s, field_maps(c, rng), np.full((len(c), 2), 0.5), np.ones(len(c)))
    print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def peak_mb() -> float:
    """Peak RSS of this process: VmHWM (ru_maxrss would include the parent's, inherited through exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def child(kind: str, store: str, out: str, chunk: int) -> None:
    """Run one stitcher in this (fresh) process; print seconds and peak RSS as JSON."""
    from wsi_scaat.heatmaps import stitch, stitch_dense

    base = peak_mb()
    t0 = time.perf_counter()
    if kind == "stitch":
        stitch(store, out, chunk=chunk)
    else:
        stitch_dense(store)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_mb(), "base_rss_mb": base}))


def run_child(kind: str, store: Path, out: Path, chunk: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, str(store), str(out), str(chunk)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{kind} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(size: int, dense_size: int, chunk: int = 1024, tissue: float = 0.6, keep: bool = False) -> dict:
    """``stitch`` on the ``size`` slide; ``stitch`` and ``stitch_dense`` on the ``dense_size`` slide.

    Each is a dict of seconds, peak_rss_mb and base_rss_mb (after imports), measured in a subprocess.
    """
    out: dict[str, Any] = {}
    for key, kind, side in [
        ("big", "stitch", size),
        ("stitch", "stitch", dense_size),
        ("dense", "dense", dense_size),
    ]:
        heatmap = CACHE / f"bench_stitch_{side}.heatmap.zarr"
        out[key] = run_child(kind, bench_store(side, tissue), heatmap, chunk)
        if not keep:
            shutil.rmtree(heatmap, ignore_errors=True)
    return out


def heatmap_mp(size: int) -> float:
    """Megapixels of the level-0 heatmap of a ``size`` px square slide."""
    return math.ceil(size / (PATCH / MAP)) ** 2 / 1e6


def run(quick: bool = False, size: int | None = None, dense_size: int | None = None, chunk: int = 1024,
        tissue: float = 0.6) -> list[dict[str, Any]]:  # fmt: skip
    """Rows for the combined table: stitch vs a dense canvas; speed and peak RSS on the large slide."""
    size = size or (20_000 if quick else 100_000)
    dense_size = dense_size or (6000 if quick else 20_000)
    m = measure(size, dense_size, chunk, tissue)
    big, st, dense = m["big"], m["stitch"], m["dense"]
    small = f"{dense_size:,}^2 px slide"
    speed, dense_speed = heatmap_mp(dense_size) / st["seconds"], heatmap_mp(dense_size) / dense["seconds"]
    canvas_mb = heatmap_mp(size) * 1e6 * 16 / 2**20  # float64 numerator and denominator
    rss_ratio = big["peak_rss_mb"] / st["peak_rss_mb"]
    row = {"benchmark": "stitching", "unit": "heatmap MP/s"}
    return [
        row | {"measured": f"stitch (dask, zarr pyramid written), {small}", "figure": speed,
               "reference": f"{dense_speed:,.1f} heatmap MP/s stitch_dense (numpy canvas, nothing written)",
               "ratio": speed / dense_speed, "goal": ">= 0.5x", "goal_met": speed >= 0.5 * dense_speed},
        row | {"measured": f"stitch, {size:,}^2 px slide ({big['seconds']:,.0f} s)",
               "figure": heatmap_mp(size) / big["seconds"], "reference": "-", "ratio": "-", "goal": "-"},
        row | {"measured": f"stitch peak RSS, {size:,}^2 px slide", "figure": big["peak_rss_mb"],
               "unit": "MB",
               "reference": f"{st['peak_rss_mb']:,.0f} MB on the {small} ({(size / dense_size) ** 2:.0f}x "
               f"fewer px); a dense canvas: {canvas_mb:,.0f} MB", "ratio": rss_ratio,
               "goal": "bounded: <= 2x", "goal_met": rss_ratio <= 2},
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="slide side (px) of the out-of-core run")
    ap.add_argument("--dense-size", type=int, default=20_000, help="slide side (px) of stitch vs dense")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--tissue", type=float, default=0.6, help="fraction of the grid positions with a patch")
    ap.add_argument("--keep", action="store_true", help="keep the output heatmaps in the cache")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "STORE", "OUT", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, store, out, chunk = args.child
        child(kind, store, out, int(chunk))
        return

    print(machine())
    print(f"patches {PATCH} px at {MPP} mpp, maps {MAP} px (heatmap = slide / {PATCH // MAP}), "
          f"chunk {args.chunk}, tissue {args.tissue:.0%} of the grid\n", flush=True)  # fmt: skip
    m = measure(args.size, args.dense_size, args.chunk, args.tissue, args.keep)
    r, hm = m["big"], heatmap_mp(args.size)
    rows = [{"slide px": f"{args.size:,}^2", "heatmap px": f"{math.isqrt(round(hm * 1e6)):,}^2",
             "stitch s": r["seconds"], "heatmap MP/s": hm / r["seconds"],
             "level-0 MP/s": args.size**2 / 1e6 / r["seconds"], "peak RSS MB": r["peak_rss_mb"],
             "RSS over imports MB": r["peak_rss_mb"] - r["base_rss_mb"]}]  # fmt: skip
    print("## Out-of-core stitch (subprocess: level 0 + pyramid written to zarr)\n")
    print(table(rows, list(rows[0])) + "\n", flush=True)
    s, d = m["stitch"], m["dense"]
    rows = [
        {"method": "stitch (dask, zarr pyramid)", "seconds": s["seconds"], "peak RSS MB": s["peak_rss_mb"]},
        {"method": "stitch_dense (numpy canvas)", "seconds": d["seconds"], "peak RSS MB": d["peak_rss_mb"]},
    ]
    print(f"## stitch vs dense canvas, {args.dense_size:,}^2 px slide\n")
    print(table(rows, ["method", "seconds", "peak RSS MB"]))
    print(f"\nstitch speed / dense speed = {d['seconds'] / s['seconds']:.2f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
