"""Saliency-stage throughput vs its floor: a bare forward + backward loop of the same model.

    python benchmarks/bench_saliency.py [--quick] [--size 6000] [--patch-size 48] [--width 32]
                                        [--batch 128] [--repeat 5]

A synthetic slide (cached in benchmarks/.cache) is tiled at 1.0 mpp into a patch store; an
untrained ``small_cnn`` is saved as a checkpoint. Measured, on the same device and batch size:
(a) ``run_saliency`` end to end (store read, ``gradient`` attribution, saliency store write);
(b) the floor: the same batches already in memory as tensors, forward + backward to the input of
the same model, nothing else. Both are warmed up once, then take turns ``--repeat`` times; the
median time of each counts. Goal: (a) / (b) >= 0.8.

Both run in one subprocess with ``OMP_WAIT_POLICY=PASSIVE`` (unless the caller sets it). With
libgomp's default on a loaded machine, the bare loop's idle OpenMP thread spin-waits (40% of its
samples under perf here) and it ran up to 2x slower than the stage (whose reader thread runs torch
ops in a second OpenMP team; libgomp then likely throttles spinning, as it manages more threads than
cores: the stage showed 1% of samples in libgomp). Profiled here (2 cores), the stage
spends ~95% of its time in the forward + backward; reads overlap with compute, the write is ~3%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import bench_slide  # noqa: E402

from wsi_scaat.models import ModelConfig, build_model  # noqa: E402
from wsi_scaat.saliency.stage import load_model, run_saliency  # noqa: E402
from wsi_scaat.slides.tiling import TileParams, tile_slide  # noqa: E402
from wsi_scaat.store import open_store  # noqa: E402
from wsi_scaat.training.checkpoint import save_checkpoint  # noqa: E402
from wsi_scaat.training.loop import resolve_device  # noqa: E402

from common import machine, table, timed  # noqa: E402

GOAL = 0.8
CLASSES = ["normal", "lesion"]


def make_checkpoint(path: Path, patch_size: int, width: int) -> Path:
    """An untrained small_cnn saved as a checkpoint the saliency stage can load."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="small_cnn", width=width)
    model = build_model(cfg, len(CLASSES))
    state = {"model": model.state_dict(), "model_config": cfg.model_dump(mode="json"),
             "class_names": CLASSES, "patch_size": patch_size, "patch_mpp": 1.0, "method": "erm"}  # fmt: skip
    save_checkpoint(path, state)
    return path


def floor_loop(model: torch.nn.Module, batches: list[torch.Tensor]) -> int:
    """Forward + backward to the input of every batch (predicted class); returns the patches seen."""
    for x in batches:
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    return sum(len(x) for x in batches)


def measure(size: int, patch_size: int, width: int, batch: int, repeat: int, device: str) -> dict[str, Any]:
    """Seconds of the stage and of the floor (best of ``repeat``) and the number of patches."""
    dev = resolve_device(device)
    work = Path(tempfile.mkdtemp(prefix="bench_saliency_"))
    try:
        params = TileParams(patch_size=patch_size, target_mpp=1.0, min_tissue=0.5)
        store = tile_slide(bench_slide(size), work / "tiles", params, progress=False)
        ckpt = make_checkpoint(work / "model.pt", patch_size, width)
        with open_store(store) as patches:
            imgs = np.asarray(patches.imgs[:])
        n = len(imgs)
        batches = [torch.from_numpy(imgs[s : s + batch]).permute(0, 3, 1, 2).float().div(255).to(dev)
                   for s in range(0, n, batch)]  # fmt: skip
        model, _ = load_model(ckpt, dev)
        for p in model.parameters():
            p.requires_grad_(False)  # as in the stage: input gradients only
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def stage(k: int) -> None:
            run_saliency(ckpt, store, work / f"out{k}", batch_size=batch, device=str(dev), progress=False)
            sync()

        def floor() -> None:
            floor_loop(model, batches)
            sync()

        stages, floors = [], []
        stage(0), floor()  # warm-up
        for k in range(repeat):  # taking turns, so that other load hits both alike
            stages.append(timed(lambda k=k: stage(k + 1))[0])
            floors.append(timed(floor)[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"patches": n, "stage_s": statistics.median(stages), "floor_s": statistics.median(floors),
            "device": str(dev), "stage_runs_s": stages, "floor_runs_s": floors}  # fmt: skip


def measure_in_child(opts: dict[str, Any]) -> dict[str, Any]:
    """``measure(**opts)`` in a fresh process with ``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it."""
    env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)
    cmd = [sys.executable, __file__, "--child", json.dumps(opts)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"saliency benchmark failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"omp_wait_policy": env["OMP_WAIT_POLICY"]}


def run(quick: bool = False, **kw: Any) -> list[dict[str, Any]]:
    """Rows for the combined table: the stage's patches/s against its floor's."""
    opts = {"size": 3000 if quick else 6000, "patch_size": 48, "width": 32, "batch": 128,
            "repeat": 1 if quick else 5, "device": "auto"} | kw  # fmt: skip
    m = measure_in_child(opts)
    n, ps = m["patches"], opts["patch_size"]
    what = f"{n:,} patches {ps} px, small_cnn w{opts['width']}, batch {opts['batch']}, {m['device']}"
    what += f", OMP_WAIT_POLICY={m['omp_wait_policy']}" if m["device"] == "cpu" else ""
    floor, ratio = n / m["floor_s"], m["floor_s"] / m["stage_s"]
    return [
        {"benchmark": "saliency", "measured": f"stage: read + gradient + write ({what})",
         "figure": n / m["stage_s"], "unit": "patches/s", "reference": f"{floor:,.0f} patches/s floor "
         "(bare forward+backward, same batches in memory)", "ratio": ratio, "goal": f">= {GOAL}x",
         "goal_met": ratio >= GOAL},
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small slide, one repeat")
    ap.add_argument("--size", type=int, help="side (px) of the synthetic slide at 0.5 mpp")
    ap.add_argument("--patch-size", type=int)
    ap.add_argument("--width", type=int, help="small_cnn base width")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--device", help="auto, cpu or cuda")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    kw = {k: v for k, v in vars(args).items() if k not in ("quick", "child") and v is not None}
    rows = run(args.quick, **kw)
    print(f"machine: {machine()}\n")
    print(table(rows, ["measured", "figure", "unit", "reference", "ratio", "goal"]))


if __name__ == "__main__":
    main()
