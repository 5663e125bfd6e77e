"""CPU precision: bfloat16 autocast + channels-last against float32, for speed and for quality.

    python benchmarks/bench_cpu_precision.py [--quick] [--seeds 3] [--epochs 5] [--doc docs/benchmarks.md]

One run measures, on this machine:

1. **training steps** as the loop runs them (``method.step`` under the runtime's autocast,
   ``backward``, optimiser step) of ERM and SCAAT (``train.scaat`` defaults, no warm-up) with the
   demo's ``small_cnn`` (width 32), batch 64, at 48 and 64 px, in three settings: float32 NCHW
   (what CPU training did before ``train.amp`` / ``train.channels_last: auto``), float32
   channels-last, and bfloat16 autocast + channels-last (what ``auto`` picks on a CPU with
   AVX512-BF16 or AMX). Settings take turns over rounds; medians of the rounds count. Measured
   twice: with one torch thread (CPU time per step: the compute cost, which other load on the
   machine does not change) and with the default thread count (wall and CPU time: what a run sees
   here, under whatever else runs); and at 48 px with 2 threads pinned to one core (CPU time), as when
   other jobs hold the cores.
2. **the saliency stage** ``run_saliency`` (gradient maps, batch 128) with ``amp`` false and true on
   the same patch store, taking turns; the median of each counts (default threads).
3. **quality**: ERM and SCAAT trained by ``wsi_scaat.training.trainer.fit`` with ``--seeds`` seeds in
   each precision (``train.amp``/``channels_last`` false, and true) on a small synthetic cohort
   (generated once into the benchmark cache; one torch thread), then on its held-out slide(s): patch
   accuracy, and for the gradient maps of the lesion class Gini sparseness, relevance mass accuracy
   and pixel AUROC against the lesion annotations (patches holding lesion) and deletion AUC (lesion
   patches, blur baseline). Maps come from float32 saliency (the training precision alone) and, for the
   bf16-trained models, from bfloat16 saliency too (the new defaults end to end). Per precision:
   mean, standard deviation and range over the seeds, and whether the bf16 mean lies within the
   float32 seeds' range.
4. **map agreement** of bfloat16 against float32 saliency on the same models and patches:
   Spearman rank correlation per map, and the Gini difference; as a yardstick, the same for float32
   maps against their own float16 rounding (the saliency store keeps maps in float16).

The CPU-specific part is what ``auto`` resolves to: on a CPU without native bf16 the bf16 rows run
emulated (slow) and say so in the header.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_saliency import make_checkpoint  # noqa: E402
from bench_tiling import bench_slide  # noqa: E402

from wsi_scaat.config import validate_config  # noqa: E402
from wsi_scaat.evaluation.groundtruth import LesionRegion  # noqa: E402
from wsi_scaat.metrics import (  # noqa: E402
    auroc_localisation,
    deletion_auc,
    relevance_mass_accuracy,
    sparseness_gini,
)
from wsi_scaat.models import ModelConfig, build_model  # noqa: E402
from wsi_scaat.saliency.stage import explain_batch, load_model, run_saliency  # noqa: E402
from wsi_scaat.slides.tiling import TileParams, tile_slide  # noqa: E402
from wsi_scaat.store import open_store  # noqa: E402
from wsi_scaat.training.loop import make_runtime  # noqa: E402
from wsi_scaat.training.methods import ScaatConfig, build_method  # noqa: E402
from wsi_scaat.training.methods.base import fast_bf16  # noqa: E402
from wsi_scaat.training.trainer import fit  # noqa: E402

from common import CACHE, machine, table, write_section  # noqa: E402

#: label -> (train.amp, train.channels_last), in the order of the tables.
SETTINGS = {
    "fp32 NCHW": (False, False),
    "fp32 channels-last": (False, True),
    "bf16 + channels-last": (True, True),
}
PRECISIONS = {"fp32": (False, False), "bf16": (True, True)}  # quality: (train.amp, train.channels_last)
METRICS = ("accuracy", "gini", "relevance_mass", "auroc_localisation", "deletion_auc")
HIGHER = {
    "accuracy": True,
    "gini": True,
    "relevance_mass": True,
    "auroc_localisation": True,
    "deletion_auc": False,
}

#: The markdown section of the last full ``run`` (``run_all`` writes it into docs/benchmarks.md).
last_report: str | None = None


# --- 1. training steps ---------------------------------------------------------------------------


def step_times(
    sizes: tuple[int, ...], batch: int, rounds: int, steps: int, warmup: int, threads: int
) -> dict[tuple, dict[str, float]]:
    """Median over rounds of one training step's wall and CPU seconds with ``threads`` torch threads,
    keyed (size, method, setting)."""
    train = argparse.Namespace(scaat=ScaatConfig(warmup_epochs=0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cases = []
    for size in sizes:
        g = torch.Generator().manual_seed(size)
        x = torch.rand(batch, 3, size, size, generator=g)
        y = torch.randint(0, 2, (batch,), generator=g)
        for name in ("erm", "scaat"):
            for label, (amp, cl) in SETTINGS.items():
                torch.manual_seed(0)
                rt = make_runtime(torch.device("cpu"), amp, cl)
                model = build_model(ModelConfig(name="small_cnn", width=32), 2)
                model = model.to(memory_format=torch.channels_last) if cl else model
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                cases.append(((size, name, label), (model.train(), opt, build_method(name, train), rt, x, y)))

    def step(model: Any, opt: Any, method: Any, rt: Any, x: Any, y: Any) -> None:
        xb = rt.to_device(x)
        with rt.autocast():
            out = method.step(model, xb, y, 10.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    try:
        for _, args in cases:
            for _ in range(warmup):
                step(*args)
        times: dict[tuple, dict[str, list[float]]] = {key: {"wall": [], "cpu": []} for key, _ in cases}
        for _ in range(rounds):  # settings take turns, so that other load hits them alike
            for key, args in cases:
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    step(*args)
                times[key]["wall"].append((time.perf_counter() - w0) / steps)
                times[key]["cpu"].append((time.process_time() - c0) / steps)
    finally:
        torch.set_num_threads(before)
    return {key: {k: statistics.median(v) for k, v in t.items()} for key, t in times.items()}


def oversubscribed_times(rounds: int, steps: int, warmup: int) -> dict[tuple, dict[str, float]] | None:
    """:func:`step_times` at 48 px with 2 torch threads on one core (a child process pinned to it), as
    when other jobs hold the cores; None where the platform cannot pin."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cmd = [sys.executable, __file__, "--pinned", json.dumps([rounds, steps, warmup])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pinned step timing failed:\n{done.stderr}")
    return {tuple(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1])}


def _pinned(rounds: int, steps: int, warmup: int) -> None:
    """The child of :func:`oversubscribed_times`: pin to one core before torch starts its threads."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    times = step_times((48,), 64, rounds, steps, warmup, threads=2)
    print(json.dumps([[list(k), v] for k, v in times.items()]))


# --- 2. saliency stage ---------------------------------------------------------------------------


def saliency_times(work: Path, size: int, repeat: int) -> dict[str, Any]:
    """Median wall and CPU seconds of ``run_saliency`` with amp false and true on one store, taking turns."""
    store = tile_slide(
        bench_slide(size), work / "tiles", TileParams(patch_size=48, target_mpp=1.0), progress=False
    )
    ckpt = make_checkpoint(work / "model.pt", 48, 32)
    with open_store(store) as s:
        n = len(s)
    runs: dict[str, dict[str, list[float]]] = {p: {"wall": [], "cpu": []} for p in ("fp32", "bf16")}
    for k in range(repeat + 1):  # the first turn warms up
        for label, amp in (("fp32", False), ("bf16", True)):
            w0, c0 = time.perf_counter(), time.process_time()
            run_saliency(
                ckpt, store, work / f"sal_{label}_{k}", device="cpu", amp=amp, batch_size=128, progress=False
            )
            if k:
                runs[label]["wall"].append(time.perf_counter() - w0)
                runs[label]["cpu"].append(time.process_time() - c0)
    medians = {label: {k: statistics.median(v) for k, v in t.items()} for label, t in runs.items()}
    return {"patches": n, **medians}


# --- 3. quality ----------------------------------------------------------------------------------


def cohort(n_slides: int, side: int) -> tuple[Path, Path]:
    """A synthetic cohort tiled at 48 px, 1 um/px (as the demo), cached: (manifest, results folder)."""
    from wsi_scaat.synth import make_cohort

    root = CACHE / f"cpu_precision_{n_slides}x{side}"
    manifest, results = root / "data" / "manifest.csv", root / "results"
    tiles = results / "bench" / "tiles"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating and tiling {n_slides} slides of {side} px -> {root}", file=sys.stderr, flush=True)
        make_cohort(root / "data", n_slides, side, side, seed=5)
        for row in csv.DictReader(manifest.open()):
            ann = root / "data" / row["annotations"]
            params = TileParams(patch_size=48, target_mpp=1.0)
            tile_slide(root / "data" / row["path"], tiles, params, slide_id=row["slide_id"], annotations=ann,
                       progress=False)  # fmt: skip
        (root / "done").touch()
    return manifest, results


def train_config(manifest: Path, results: Path, seed: int, epochs: int, amp: bool, cl: bool) -> Any:
    """The demo's training settings on the benchmark cohort, in one precision."""
    return validate_config({
        "cohort": {"name": "bench", "manifest": str(manifest)}, "results_dir": str(results),
        "tiling": {"patch_size": 48, "target_mpp": 1.0},
        "train": {"device": "cpu", "epochs": epochs, "batch_size": 64, "lr": 0.002, "seed": seed,
                  "model": {"name": "small_cnn", "width": 32}, "select_by": "last",
                  "augment": {"flips": True, "rotate90": True, "color_jitter": 0.05},
                  "scaat": {"warmup_epochs": min(2.0, epochs / 3)}, "amp": amp, "channels_last": cl},
    })  # fmt: skip


class HeldOut:
    """The held-out (test) patches of the cohort in memory, with lesion masks at patch resolution."""

    def __init__(self, manifest: Path, results: Path) -> None:
        xs, labels, masks = [], [], []
        for row in csv.DictReader(manifest.open()):
            if row["split"] != "test":
                continue
            region = LesionRegion.from_geojson(manifest.parent / row["annotations"], "lesion")
            with open_store(results / "bench" / "tiles" / f"{row['slide_id']}.h5") as s:
                imgs, coords = np.asarray(s.imgs[:]), s.coords
                labels.append(s.array("labels").astype(np.int64))
                size0 = float(s.attrs["patch_size_level0"])
            xs.append(torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255))
            masks.append(torch.from_numpy(region.patch_masks(coords, size0, imgs.shape[1])))
        self.x, self.labels, self.masks = (
            torch.cat(xs),
            torch.from_numpy(np.concatenate(labels)),
            torch.cat(masks),
        )
        self.lesion = self.masks.flatten(1).any(1)  # patches holding lesion: localisation
        g = torch.Generator().manual_seed(0)
        pos = torch.nonzero(self.labels == 1)[:, 0]
        self.faith = pos[torch.randperm(len(pos), generator=g)[:128]].sort().values  # deletion sample

    def maps(self, model: torch.nn.Module, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities and float32 gradient maps of the lesion class over all patches."""
        probs, maps = [], []
        dtype = torch.bfloat16 if amp else None
        for a in range(0, len(self.x), 128):
            p, _, m, _ = explain_batch(model, self.x[a : a + 128], 1, "gradient", {}, dtype)
            probs.append(p)
            maps.append(m)
        return torch.cat(probs), torch.cat(maps)

    def metrics(self, model: torch.nn.Module, probs: torch.Tensor, maps: torch.Tensor) -> dict[str, float]:
        """Accuracy and the map metrics of one model's maps (float32 model passes for deletion)."""
        lesion, faith = self.lesion, self.faith
        target = torch.ones(len(faith), dtype=torch.long)
        return {
            "accuracy": float((probs.argmax(1) == self.labels).double().mean()),
            "gini": float(sparseness_gini(maps).mean()),
            "relevance_mass": float(relevance_mass_accuracy(maps[lesion], self.masks[lesion]).nanmean()),
            "auroc_localisation": float(auroc_localisation(maps[lesion], self.masks[lesion]).nanmean()),
            "deletion_auc": float(deletion_auc(model, self.x[faith], maps[faith], target).mean())
            if len(faith)
            else math.nan,
        }


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation per map of two (B, ...) stacks (midranks: float16 maps have ties)."""
    from scipy.stats import rankdata

    ra, rb = (torch.from_numpy(rankdata(m.flatten(1).double().numpy(), axis=1)) for m in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def quality(seeds: int, epochs: int, n_slides: int, side: int, work: Path) -> dict[str, Any]:
    """Metrics per (method, precision, maps) and seed, and the bf16-vs-fp32 map agreement."""
    manifest, results = cohort(n_slides, side)
    held = HeldOut(manifest, results)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the comparison does not need speed; one thread is immune to other load
    try:
        return _quality(held, manifest, results, seeds, epochs, work)
    finally:
        torch.set_num_threads(before)


def _quality(
    held: HeldOut, manifest: Path, results: Path, seeds: int, epochs: int, work: Path
) -> dict[str, Any]:
    values: dict[tuple[str, str], list[dict[str, float]]] = {}
    agree: dict[str, list[torch.Tensor]] = {"rho_bf16": [], "gini_bf16": [], "rho_fp16": [], "gini_fp16": []}
    seconds: dict[tuple[str, str], float] = {}
    for method in ("erm", "scaat"):
        for seed in range(seeds):
            for prec, (amp, cl) in PRECISIONS.items():
                out = work / f"{method}_{prec}_{seed}"
                t0 = time.perf_counter()
                fit(
                    train_config(manifest, results, seed, epochs, amp, cl),
                    method,
                    out,
                    log=_quiet,
                    show_progress=False,
                )
                seconds[(method, prec)] = seconds.get((method, prec), 0.0) + time.perf_counter() - t0
                model, _ = load_model(out / "best.pt", torch.device("cpu"))
                for p in model.parameters():
                    p.requires_grad_(False)
                probs, maps = held.maps(model, amp=False)
                values.setdefault((method, f"{prec} train, fp32 maps"), []).append(
                    held.metrics(model, probs, maps)
                )
                probs16, maps16 = held.maps(model, amp=True)
                if prec == "bf16":
                    values.setdefault((method, "bf16 train, bf16 maps"), []).append(
                        held.metrics(model, probs16, maps16)
                    )
                agree["rho_bf16"].append(rank_correlation(maps, maps16))
                agree["gini_bf16"].append(sparseness_gini(maps16) - sparseness_gini(maps))
                half = maps.half().float()
                agree["rho_fp16"].append(rank_correlation(maps, half))
                agree["gini_fp16"].append(sparseness_gini(half) - sparseness_gini(maps))
    n = {"test": len(held.x), "lesion": int(held.lesion.sum()), "faith": len(held.faith)}
    return {"values": values, "agree": {k: torch.cat(v) for k, v in agree.items()}, "n": n,
            "train_seconds": seconds, "seeds": seeds, "epochs": epochs}  # fmt: skip


def _quiet(_: str) -> None:
    pass


# --- the report ----------------------------------------------------------------------------------

CL = "bf16 + channels-last"


def _spread(v: list[float]) -> tuple[float, float, float, float]:
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else math.nan, min(v), max(v)


def quality_rows(q: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (method, arm, metric): mean, sd and range over seeds; a bf16 arm's mean against fp32's range."""
    rows = []
    for (method, arm), runs in q["values"].items():
        for metric in METRICS:
            mean, sd, lo, hi = _spread([r[metric] for r in runs])
            row = {
                "method": method,
                "arm": arm,
                "metric": metric,
                "mean": mean,
                "sd": sd,
                "min": lo,
                "max": hi,
            }
            if not arm.startswith("fp32"):
                ref = [r[metric] for r in q["values"][(method, "fp32 train, fp32 maps")]]
                row["within fp32 range"] = "yes" if min(ref) <= mean <= max(ref) else "no"
                sd_ref = statistics.stdev(ref) if len(ref) > 1 else math.nan
                row["diff / fp32 sd"] = (mean - statistics.mean(ref)) / sd_ref if sd_ref > 0 else math.nan
            rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 4) -> Any:
    return f"{v:.{digits}f}" if isinstance(v, float) and math.isfinite(v) else v


def _step_table(steps: dict[tuple, dict[str, float]], kind: str) -> str:
    """ms per step of each setting (``kind``: wall or cpu), the speed-up and SCAAT's cost over ERM's."""
    rows = []
    for size in sorted({k[0] for k in steps}):
        t = {k[1:]: v[kind] for k, v in steps.items() if k[0] == size}
        for method in ("erm", "scaat"):
            row: dict[str, Any] = {"patch": f"{size} px", "method": method}
            row |= {f"{label} ms": f"{1000 * t[(method, label)]:.0f}" for label in SETTINGS}
            row["fp32 NCHW / bf16+CL"] = f"{t[(method, 'fp32 NCHW')] / t[(method, CL)]:.2f}x"
            for label in ("fp32 NCHW", CL):  # on the scaat row
                ratio = t[("scaat", label)] / t[("erm", label)]
                row[f"scaat / erm, {label}"] = f"{ratio:.2f}x" if method == "scaat" else ""
            rows.append(row)
    return table(rows, list(rows[0]))


def _agreement_table(a: dict[str, torch.Tensor]) -> str:
    rows = []
    for what, key in (
        ("bf16 saliency (`saliency.amp`)", "bf16"),
        ("their float16 rounding (the store)", "fp16"),
    ):
        rho, gini = a[f"rho_{key}"], a[f"gini_{key}"]
        rows.append({"against fp32 maps": what, "Spearman mean": _fmt(float(rho.mean())),
                     "Spearman 5th pct": _fmt(float(rho.quantile(0.05))),
                     "Gini diff mean": _fmt(float(gini.mean()), 5),
                     "Gini abs diff max": _fmt(float(gini.abs().max()), 5)})  # fmt: skip
    return table(rows, list(rows[0]))


def report(
    steps: dict[int, dict],
    pinned: dict[tuple, dict] | None,
    sal: dict[str, Any],
    q: dict[str, Any],
    header: str,
) -> str:
    """The markdown section: settings, figures and the verdicts."""
    n, a, nn = sal["patches"], q["agree"], q["n"]
    (one, many), threads = sorted(steps), max(steps)
    sal_rows = [{"precision": p, "wall s": f"{sal[p]['wall']:.2f}", "CPU s": f"{sal[p]['cpu']:.2f}",
                 "patches/s": f"{n / sal[p]['wall']:,.0f}"} for p in ("fp32", "bf16")]  # fmt: skip
    secs = ", ".join(f"{m} {p} {s / q['seeds']:.0f} s" for (m, p), s in q["train_seconds"].items())
    shown = [{k: _fmt(v) for k, v in r.items()} for r in quality_rows(q)]
    cols = ["method", "arm", "metric", "mean", "sd", "min", "max", "within fp32 range", "diff / fp32 sd"]
    return "\n".join([
        "## CPU precision: bfloat16 autocast and channels-last", "",
        f"Written by `benchmarks/bench_cpu_precision.py` (see its docstring). {header}", "",
        "### Training step: CPU ms per step of 64 patches, one torch thread (median of the rounds)", "",
        "CPU time per patch, what `train.amp` and `train.channels_last` are to halve; with one thread it "
        "does not depend on what else runs on the machine.", "",
        _step_table(steps[one], "cpu"), "",
        f"### Training step: wall ms per step, {threads} torch threads (the default here, under its load)",
        "",
        _step_table(steps[many], "wall"), "",
        f"CPU ms per step with {threads} threads (above the one-thread figures: time spent waiting in spin "
        "loops, e.g. for a thread descheduled by other load):", "", _step_table(steps[many], "cpu"), "",
        *_pinned_lines(pinned),
        f"### Saliency stage: `run_saliency`, gradient maps, batch 128, 48 px, {threads} threads", "",
        table(sal_rows, list(sal_rows[0])), "",
        f"{n:,} patches; fp32 wall / bf16 wall: {sal['fp32']['wall'] / sal['bf16']['wall']:.2f}x.", "",
        "### Maps: bfloat16 against float32 saliency, same models and patches", "", _agreement_table(a), "",
        f"Over {len(a['rho_bf16']):,} maps (every held-out patch, every model of the quality check).", "",
        f"### Quality: {q['seeds']} seeds per method and precision, {q['epochs']} epochs, one thread", "",
        f"Held-out: {nn['test']} patches ({nn['lesion']} holding lesion: relevance mass and pixel AUROC; "
        f"deletion AUC on {nn['faith']} lesion patches). Mean training time per run: {secs}.", "",
        table(shown, cols), "",
    ])  # fmt: skip


def _pinned_lines(pinned: dict[tuple, dict] | None) -> list[str]:
    if pinned is None:
        return []
    return [
        "### Training step, oversubscribed: CPU ms per step, 2 torch threads pinned to one core", "",
        "As when other jobs hold the cores. oneDNN's bfloat16 weight-gradient convolutions wait for their "
        "threads in spin loops, so here bf16 costs far more CPU than float32; forward passes and input "
        "gradients (the saliency stage, SCAAT's search passes) are not affected. Where torch has more "
        "threads than free cores, set `train.amp: false` (or fewer threads).", "",
        _step_table(pinned, "cpu"), "",
    ]  # fmt: skip


def verdict_rows(
    steps: dict[int, dict], pinned: dict[tuple, dict] | None, sal: dict[str, Any], q: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows for run_all's combined table."""
    out: list[dict[str, Any]] = []
    for threads, kind in sorted((t, "cpu" if t == 1 else "wall") for t in steps):
        t = steps[threads]
        for size in sorted({k[0] for k in t}):
            for method in ("erm", "scaat"):
                base, fast = t[(size, method, "fp32 NCHW")][kind], t[(size, method, CL)][kind]
                what = (
                    f"{method} step, bf16 + channels-last, {threads} thread{'s' * (threads > 1)} {kind} time "
                )
                what += f"(small_cnn w32, batch 64, {size} px)"
                row = {
                    "measured": what,
                    "figure": 1000 * fast,
                    "unit": "ms/step",
                    "reference": f"{1000 * base:,.0f} ms/step fp32 NCHW",
                    "ratio": fast / base,
                    "goal": "-",
                }
                if kind == "cpu":
                    row |= {"goal": "<= 0.5x", "goal_met": fast / base <= 0.5}
                out.append(row)  # fmt: skip
            ratio = t[(size, "scaat", CL)][kind] / t[(size, "erm", CL)][kind]
            what = f"scaat step / erm step, both bf16 + channels-last, {threads} thread(s) {kind} ({size} px)"
            out.append({"measured": what, "figure": ratio, "unit": "x erm", "reference": "-", "goal": "-"})
    if pinned is not None:
        base, fast = pinned[(48, "erm", "fp32 NCHW")]["cpu"], pinned[(48, "erm", CL)]["cpu"]
        what = "erm step, bf16 + channels-last, 2 threads pinned to one core, cpu time (48 px)"
        out.append({"measured": what, "figure": 1000 * fast, "unit": "ms/step", "ratio": fast / base,
                    "reference": f"{1000 * base:,.0f} ms/step fp32 NCHW", "goal": "-"})  # fmt: skip
    n, fp32, bf16 = sal["patches"], sal["fp32"]["wall"], sal["bf16"]["wall"]
    what = f"saliency stage, bf16 ({n:,} patches 48 px, batch 128)"
    ref = f"{n / fp32:,.0f} patches/s fp32"
    out.append({"measured": what, "figure": n / bf16, "unit": "patches/s", "reference": ref,
                "ratio": fp32 / bf16, "goal": "-"})  # fmt: skip
    rho, rho16 = float(q["agree"]["rho_bf16"].mean()), float(q["agree"]["rho_fp16"].mean())
    out.append({"measured": "bf16 vs fp32 saliency maps: mean Spearman per map", "figure": rho, "unit": "rho",
                "reference": f"{rho16:.4f} fp32 vs its float16 rounding", "goal": "-"})  # fmt: skip
    for r in quality_rows(q):
        if r["arm"] == "bf16 train, bf16 maps":
            ref = [x[r["metric"]] for x in q["values"][(r["method"], "fp32 train, fp32 maps")]]
            what = f"{r['method']} {r['metric']}, bf16 training and maps, mean of {q['seeds']} seeds"
            span = f"fp32 {statistics.mean(ref):.4f} [{min(ref):.4f}, {max(ref):.4f}]"
            out.append({"measured": what, "figure": r["mean"], "unit": "-", "reference": span,
                        "goal": "in fp32 range", "goal_met": r["within fp32 range"] == "yes"})  # fmt: skip
    return out


def run(quick: bool = False, **kw: Any) -> list[dict[str, Any]]:
    """Rows for the combined table; sets ``last_report`` (the markdown section)."""
    global last_report
    opts = {"sizes": (48, 64), "rounds": 5, "steps": 3, "warmup": 2, "slide": 4000, "repeat": 3, "seeds": 3,
            "epochs": 5, "slides": 8, "side": 2048} | kw  # fmt: skip
    if quick:
        opts = {"sizes": (48,), "rounds": 1, "steps": 1, "warmup": 1, "slide": 1536, "repeat": 1, "seeds": 2,
                "epochs": 2, "slides": 6, "side": 1024} | kw  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench_cpu_precision_"))
    load0, t0 = _load(), time.perf_counter()
    try:
        timing = (opts["sizes"], 64, opts["rounds"], opts["steps"], opts["warmup"])
        steps = {t: step_times(*timing, threads=t) for t in (1, max(2, torch.get_num_threads()))}
        pinned = oversubscribed_times(*timing[2:])
        sal = saliency_times(work, opts["slide"], opts["repeat"])
        q = quality(opts["seeds"], opts["epochs"], opts["slides"], opts["side"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    native = "native" if fast_bf16(torch.device("cpu")) else "NOT native (emulated)"
    minutes = (time.perf_counter() - t0) / 60
    from run_all import revision

    date = time.strftime("%Y-%m-%d %H:%M %Z")
    header = (f"Machine: {machine()}; bf16 on this CPU: {native}; torch threads {torch.get_num_threads()}; "
              f"{date}, commit {revision()}; "
              f"{'quick' if quick else 'full'} run, {minutes:.1f} min; 1-min load average {load0:.1f} at the "
              f"start, {_load():.1f} at the end.")  # fmt: skip
    last_report = report(steps, pinned, sal, q, header)
    return verdict_rows(steps, pinned, sal, q)


def _load() -> float:
    import os

    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 seeds of 2 epochs (a smoke run)")
    ap.add_argument("--seeds", type=int, help="seeds per method and precision (default 3)")
    ap.add_argument("--epochs", type=int, help="training epochs of the quality check (default 5)")
    ap.add_argument("--rounds", type=int, help="rounds of the step timing (default 5)")
    ap.add_argument("--doc", type=Path, help="markdown file whose cpu_precision section to write")
    ap.add_argument("--pinned", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pinned:
        _pinned(*json.loads(args.pinned))
        return
    kw = {k: v for k, v in vars(args).items() if k in ("seeds", "epochs", "rounds") and v is not None}
    rows = run(args.quick, **kw)
    print(last_report)
    print(table(rows, ["measured", "figure", "unit", "reference", "ratio", "goal", "goal_met"]))
    if args.doc:
        write_section(args.doc, "cpu_precision", last_report or "")
        print(f"\nwritten to {args.doc}")


if __name__ == "__main__":
    main()
