"""Tiling throughput: this tiler vs tiatoolbox's SlidingWindowPatchExtractor vs the raw-decode limit.

One slide, one run, same patches (256 px at 0.5 mpp, the tiler's tissue mask given to tiatoolbox
too) written into the same store format (HDF5, one Blosc-LZ4 chunk per patch):

    python benchmarks/bench_tiling.py [--size 20000] [--patch-size 256]

The raw-decode limit reads the whole level 0 in 4096-px regions with a fresh OpenSlide handle
and does nothing else; it is measured with one thread and with one thread per core.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsi_scaat.slides import open_slide  # noqa: E402
from wsi_scaat.slides.tiling import TileParams, available_cores, tile_slide  # noqa: E402
from wsi_scaat.slides.tissue import detect_slide_tissue  # noqa: E402
from wsi_scaat.store.codecs import h5_filter  # noqa: E402

from common import CACHE, machine, table, timed  # noqa: E402


def bench_slide(size: int) -> Path:
    """The synthetic benchmark slide, generated once and cached."""
    from wsi_scaat.synth import make_slide

    path = CACHE / f"bench_{size}.tiff"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"generating {size} x {size} px benchmark slide -> {path}", flush=True)
        make_slide(path, size, size, seed=7, mpp=0.5, lesions=True)
    return path


def raw_decode(slide: Path, workers: int, region: int = 4096) -> int:
    """Decode all of level 0 in regions; returns the pixels decoded."""
    with open_slide(slide) as reader:
        w, h = reader.info.width, reader.info.height
        boxes = [(x, y, min(region, w - x), min(region, h - y)) for y in range(0, h, region)
                 for x in range(0, w, region)]  # fmt: skip
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda b: reader.read_region((b[0], b[1]), 0, (b[2], b[3])).shape, boxes))
    return w * h


def tiatoolbox_extract(slide: Path, out: Path, mask: np.ndarray, params: TileParams) -> int:
    """tiatoolbox's sliding-window extractor, each patch written to an HDF5 store like ours."""
    import logging

    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader

    logging.getLogger().setLevel(logging.ERROR)
    p = params.patch_size
    extractor = SlidingWindowPatchExtractor(
        input_img=OpenSlideWSIReader(str(slide)), patch_size=(p, p),  # the same decoder as ours
        stride=(p, p), resolution=params.target_mpp,
        units="mpp", input_mask=mask.astype(np.uint8), min_mask_ratio=params.min_tissue,
        within_bound=True,
    )  # fmt: skip
    n = len(extractor)
    with h5py.File(out, "w") as f:
        imgs = f.create_dataset("imgs", (n, p, p, 3), np.uint8, chunks=(1, p, p, 3), **h5_filter("lz4"))
        f["coords"] = extractor.coordinate_list[:, :2]
        for i, patch in enumerate(extractor):
            imgs[i] = np.asarray(patch)[..., :3]
    return n


def measure(size: int, patch_size: int) -> list[dict[str, Any]]:
    """One row per method: patches, seconds, patches/s and MP/s (ours, tiatoolbox, raw decode 1 and N)."""
    slide = bench_slide(size)
    cores = available_cores()
    params = TileParams(patch_size=patch_size, target_mpp=0.5, min_tissue=0.5)
    work = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    try:
        with open_slide(slide) as reader:
            tissue, _ = detect_slide_tissue(reader, params.thumbnail_mpp)
        side = max(1, size // 16)
        mask = np.asarray(Image.fromarray(tissue.mask).resize((side, side)))
        t_raw1, px = timed(lambda: raw_decode(slide, 1))
        t_rawn, _ = timed(lambda: raw_decode(slide, cores))
        t_ours, store = timed(lambda: tile_slide(slide, work / "ours", params, progress=False))
        with h5py.File(store) as f:
            n_ours = len(f["coords"])
        t_tia, n_tia = timed(lambda: tiatoolbox_extract(slide, work / "tia.h5", mask, params))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mp = patch_size**2 / 1e6
    return [
        {"method": f"wsi-scaat tile ({cores} threads)", "patches": n_ours, "seconds": t_ours,
         "patches/s": n_ours / t_ours, "MP/s": n_ours * mp / t_ours},
        {"method": "tiatoolbox SlidingWindowPatchExtractor", "patches": n_tia, "seconds": t_tia,
         "patches/s": n_tia / t_tia, "MP/s": n_tia * mp / t_tia},
        {"method": "raw decode, 1 thread (whole level 0)", "patches": "-", "seconds": t_raw1,
         "patches/s": "-", "MP/s": px / 1e6 / t_raw1},
        {"method": f"raw decode, {cores} threads (whole level 0)", "patches": "-", "seconds": t_rawn,
         "patches/s": "-", "MP/s": px / 1e6 / t_rawn},
    ]  # fmt: skip


def run(quick: bool = False, size: int | None = None, patch_size: int = 256) -> list[dict[str, Any]]:
    """Rows for the combined table: the tiler's MP/s against tiatoolbox and against raw decode."""
    size = size or (6000 if quick else 20000)
    ours, *refs = measure(size, patch_size)
    what = f"{ours['method']}, {size:,}^2 px slide, {ours['patches']:,} patches of {patch_size} px"
    goals = [(3.0, ">= 3x"), (None, "-"), (0.8, ">= 0.8x")]  # vs tiatoolbox, raw decode 1 and N threads
    rows = []
    for ref, (goal, text) in zip(refs, goals, strict=True):
        ratio = ours["MP/s"] / ref["MP/s"]
        row = {"benchmark": "tiling", "measured": what, "figure": ours["MP/s"], "unit": "MP/s"}
        row |= {"reference": f"{ref['MP/s']:,.1f} MP/s {ref['method']}", "ratio": ratio, "goal": text}
        rows.append(row | ({"goal_met": ratio >= goal} if goal else {}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="slide side in pixels")
    ap.add_argument("--patch-size", type=int, default=256)
    args = ap.parse_args()
    rows = measure(args.size, args.patch_size)
    ours = rows[0]["MP/s"]
    print(
        f"\nTiling benchmark: {args.size} x {args.size} px synthetic slide, {args.patch_size} px at 0.5 mpp"
    )
    print(f"machine: {machine()}\n")
    print(table(rows, ["method", "patches", "seconds", "patches/s", "MP/s"]))
    print(f"\nratio vs tiatoolbox: {ours / rows[1]['MP/s']:.2f}x (goal >= 3)")
    print(f"ratio vs raw decode, 1 thread: {ours / rows[2]['MP/s']:.2f}x")
    print(f"ratio vs raw decode, {available_cores()} threads: {ours / rows[3]['MP/s']:.2f}x (goal >= 0.8)")


if __name__ == "__main__":
    main()
