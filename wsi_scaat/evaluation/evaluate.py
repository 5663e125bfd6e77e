"""Evaluation of one trained model on the held-out slides (``wsi-scaat evaluate --model M``).

For every slide of the splits in ``evaluate.splits`` it reads the patch store (labels, lesion
fraction, pixels), the model's saliency store (class probabilities, the maps the workflow exported)
and the stitched heatmap, and measures:

- classification: patch accuracy and AUROC of the stored probabilities against the store's labels;
- complexity, on every patch: Gini sparseness and entropy of the saliency map;
- localisation, on every patch that holds lesion (ground truth rasterised from the slide's GeoJSON
  at map resolution): pointing game, relevance mass and rank accuracy, pixel AUROC;
- faithfulness, on a seeded sample of at most ``evaluate.max_patches`` of the patches whose map
  explains their true class (the saliency store's ``target`` equals the label; half of them lesion
  when there are enough): deletion and insertion AUC, ROAD (MoRF and LeRF) and the reconstruction
  check, all for that class;
- at slide level: the AUROC of the stitched heatmap against the lesion mask inside the tissue, per
  slide and pooled over the slides with lesion; and that of every heatmap value (``stitch.value``),
  blended from the saliency store on a bounded grid (:func:`~wsi_scaat.evaluation.slide_auroc.value_aurocs`).

Writes ``<out>/models/<model>.json`` (the summary) and ``<out>/models/<model>.patches.csv`` (one row
per patch and metric value, for paired comparisons), each atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsi_scaat import __version__
from wsi_scaat.atomic import write_json, write_text
from wsi_scaat.config import Config
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.evaluation.groundtruth import LesionRegion
from wsi_scaat.evaluation.slide_auroc import BINS, auroc_from_histograms, heatmap_histograms, value_aurocs
from wsi_scaat.manifest import read_manifest
from wsi_scaat.metrics import (
    auroc,
    auroc_localisation,
    complexity_entropy,
    deletion_auc,
    insertion_auc,
    pointing_game,
    reconstruction_check,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road_auc,
    sparseness_gini,
)
from wsi_scaat.saliency.store import SUFFIX as SALIENCY_SUFFIX
from wsi_scaat.saliency.store import open_saliency_store
from wsi_scaat.store import open_store

PATCH_METRICS = (
    "gini", "entropy", "pointing_game", "relevance_mass", "relevance_rank", "auroc_localisation",
    "deletion_auc", "insertion_auc", "road_morf", "road_lerf", "reconstruction_kept",
)  # fmt: skip
LOCALISATION = (
    ("pointing_game", pointing_game),
    ("relevance_mass", relevance_mass_accuracy),
    ("relevance_rank", relevance_rank_accuracy),
    ("auroc_localisation", auroc_localisation),
)
READ_BATCH = 1024
DONORS = 128  # donor patches of the reconstruction check


class EvaluationError(WsiScaatError):
    """The evaluation cannot run: no held-out slide, or a missing input."""


@dataclass(frozen=True)
class EvalSlide:
    """One held-out slide and the files evaluated for one model."""

    slide_id: str
    tiles: Path
    saliency: Path
    heatmap: Path
    annotations: Path | None


def checkpoint_of(cfg: Config, model: str) -> Path:
    """The checkpoint of model ``model``: the configured one ('pretrained') or the one trained here."""
    if model == "pretrained" and cfg.model_checkpoint is not None:
        return Path(cfg.model_checkpoint)
    return cfg.results / "models" / model / "best.pt"


def eval_slides(cfg: Config, model: str) -> list[EvalSlide]:
    """The held-out slides (manifest rows of ``evaluate.splits``) with their stores for ``model``."""
    res, ext = cfg.results, cfg.tiling.format
    slides = [
        EvalSlide(
            e.slide_id,
            res / "tiles" / f"{e.slide_id}.{ext}",
            res / "saliency" / model / f"{e.slide_id}{SALIENCY_SUFFIX}",
            res / "heatmaps" / model / f"{e.slide_id}.heatmap.zarr",
            e.annotations,
        )  # fmt: skip
        for e in read_manifest(cfg.cohort.manifest)
        if e.split in cfg.evaluate.splits
    ]
    if not slides:
        raise EvaluationError(cfg.cohort.manifest, f"no slide of split(s) {cfg.evaluate.splits} to evaluate")
    return slides


def strength_label(cfg: Config, model: str) -> tuple[str, str]:
    """(method, its main strength knobs as text) of model ``model``."""
    if model == "pretrained":
        return "pretrained", ""
    method, run_cfg = cfg.training_run(model)
    t = run_cfg.train
    knobs = {
        "scaat": f"mask_ratio={t.scaat.mask_ratio:g} eps={t.scaat.eps:g}",
        "advgrad": f"{t.advgrad.variant} {t.advgrad.mode} eps={t.advgrad.eps:g}",
        "sgt": f"mask_fraction={t.sgt.mask_fraction:g}",
    }
    return method, knobs.get(method, "")


def _to_tensor(maps: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.nan_to_num(np.asarray(maps, dtype=np.float32), posinf=65504.0))


def _sample(labels: list[np.ndarray], eligible: list[np.ndarray], n_max: int, seed: int) -> list[np.ndarray]:
    """Seeded sample of at most ``n_max`` eligible patches over slides, half lesion (label 1) when
    available; per slide, sorted patch indices."""
    slide = np.concatenate([np.full(len(lab), k) for k, lab in enumerate(labels)]).astype(np.int64)
    index = np.concatenate([np.arange(len(lab)) for lab in labels]).astype(np.int64)
    lesion = np.concatenate(labels).astype(np.int64) == 1
    ok = np.concatenate(eligible).astype(bool)
    rng = np.random.default_rng(seed)
    pos, neg = rng.permutation(np.flatnonzero(lesion & ok)), rng.permutation(np.flatnonzero(~lesion & ok))
    n_pos = min(len(pos), max(n_max // 2, n_max - len(neg)))
    chosen = np.concatenate([pos[:n_pos], neg[: n_max - n_pos]])
    return [np.sort(index[chosen[slide[chosen] == k]]) for k in range(len(labels))]


def _read_patches(store: Any, idx: np.ndarray) -> torch.Tensor:
    imgs = np.asarray(store.imgs[idx]) if len(idx) else np.zeros((0, 1, 1, 3), np.uint8)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255)


def _maps_for(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps at patch resolution (nearest upsampling when stored downsampled)."""
    if maps.shape[-1] == size:
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode="nearest")[:, 0]


def _ci(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, 95% normal-approximation half-width and count of the finite values."""
    v = values[np.isfinite(values)]
    if not len(v):
        return float("nan"), float("nan"), 0
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), half, int(len(v))


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate_model(
    cfg: Config, model: str, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Evaluate ``model`` on the held-out slides; writes ``models/<model>.json`` and ``.patches.csv``."""
    from wsi_scaat.saliency.stage import load_model
    from wsi_scaat.training.loop import resolve_device

    ec = cfg.evaluate
    slides = eval_slides(cfg, model)
    for s in slides:
        for path in (s.tiles, s.saliency, s.heatmap):
            if not path.exists():
                raise EvaluationError(path, f"missing input of the evaluation of {model!r}")
    ckpt = checkpoint_of(cfg, model)
    dev = resolve_device(ec.device)
    net, state = load_model(ckpt, dev)
    class_names = list(state["class_names"])
    lesion = cfg.tiling.annotation_class
    lesion_class = class_names.index(lesion) if lesion in class_names else len(class_names) - 1
    rows: dict[str, dict[tuple[str, int], float]] = {m: {} for m in PATCH_METRICS}
    labels_all, probs_all, eligible = [], [], []
    hist_pos, hist_neg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    per_slide = []
    regions = {}
    for s in slides:
        region = LesionRegion.from_geojson(s.annotations, cfg.tiling.annotation_class)
        regions[s.slide_id] = region
        with open_store(s.tiles) as tiles:
            labels = tiles.array("labels").astype(np.int64)
            lf = tiles.array("lesion_fraction") if "lesion_fraction" in tiles else labels.astype(np.float32)
            coords, size0 = tiles.coords, float(tiles.attrs["patch_size_level0"])
        sal = open_saliency_store(s.saliency)
        probs = sal.array("probs")
        if len(probs) != len(labels):
            raise EvaluationError(s.saliency, f"{len(probs)} patches but the patch store has {len(labels)}")
        labels_all.append(labels)
        probs_all.append(probs)
        eligible.append(sal.array("target") == labels)  # faithfulness: maps of the patch's true class
        maps, m = sal.maps, int(sal.attrs["map_size"])
        for a in range(0, len(labels), READ_BATCH):
            b = min(a + READ_BATCH, len(labels))
            batch = _to_tensor(maps[a:b])
            keys = [(s.slide_id, i) for i in range(a, b)]
            for name, fn in (("gini", sparseness_gini), ("entropy", complexity_entropy)):
                rows[name].update(zip(keys, fn(batch).double().tolist(), strict=True))
            has = np.flatnonzero(lf[a:b] > 0)
            if len(has) and not region.empty:
                gt = torch.from_numpy(region.patch_masks(coords[a + has], size0, m))
                sub, sub_keys = batch[has], [keys[i] for i in has]
                for name, fn in LOCALISATION:
                    rows[name].update(zip(sub_keys, fn(sub, gt).double().tolist(), strict=True))
        slide_auc = float("nan")
        if not region.empty:
            pos, neg = heatmap_histograms(s.heatmap, s.saliency, region)
            hist_pos += pos
            hist_neg += neg
            slide_auc = auroc_from_histograms(pos, neg)
        per_slide.append(
            {
                "slide_id": s.slide_id,
                "n_patches": len(labels),
                "heatmap_auroc": _finite(slide_auc),
                "accuracy": float((probs.argmax(1) == labels).mean()) if len(labels) else None,
            }
        )
        log(f"{model}: {s.slide_id}: {len(labels)} patches, heatmap AUROC {slide_auc:.3f}")

    chosen = _sample(labels_all, eligible, ec.max_patches, ec.seed)
    donors = _donors(slides, labels_all, ec.seed)
    gen = torch.Generator().manual_seed(ec.seed)
    for s, idx in zip(slides, chosen, strict=True):
        sal = open_saliency_store(s.saliency)
        target_all = sal.array("target")
        with open_store(s.tiles) as tiles:
            for a in range(0, len(idx), ec.batch_size):
                sel = idx[a : a + ec.batch_size]
                x = _read_patches(tiles, sel)
                attr = _maps_for(_to_tensor(sal.maps.get_orthogonal_selection((sel,))), x.shape[-1])
                target = torch.from_numpy(target_all[sel]).long()
                keys = [(s.slide_id, int(i)) for i in sel]
                x, attr_d, target_d = x.to(dev), attr.to(dev), target.to(dev)
                values = {
                    "deletion_auc": deletion_auc(net, x, attr_d, target_d, steps=ec.deletion_steps),
                    "insertion_auc": insertion_auc(net, x, attr_d, target_d, steps=ec.deletion_steps),
                    "road_morf": road_auc(net, x, attr_d, target_d, percentages=ec.road_percentages,
                                          order="morf", seed=ec.seed),
                    "road_lerf": road_auc(net, x, attr_d, target_d, percentages=ec.road_percentages,
                                          order="lerf", seed=ec.seed),
                }  # fmt: skip
                rec = reconstruction_check(
                    net,
                    x,
                    attr_d,
                    donors.to(dev),
                    keep=ec.reconstruction_keep,
                    seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
                )
                values["reconstruction_kept"] = rec.unchanged[:, 0].double()
                for name, v in values.items():
                    rows[name].update(zip(keys, v.detach().double().cpu().tolist(), strict=True))
        log(f"{model}: {s.slide_id}: faithfulness on {len(idx)} patches")

    labels_cat = np.concatenate(labels_all)
    probs_cat = np.concatenate(probs_all)
    method, knobs = strength_label(cfg, model)
    summary: dict[str, Any] = {
        "model": model, "method": method, "knobs": knobs, "checkpoint": str(ckpt),
        "saliency_method": cfg.saliency.method, "saliency_target": cfg.saliency.target,
        "splits": list(ec.splits), "n_slides": len(slides), "n_patches": int(len(labels_cat)),
        "accuracy": float((probs_cat.argmax(1) == labels_cat).mean()) if len(labels_cat) else None,
        "auroc": _finite(auroc(probs_cat[:, lesion_class], labels_cat == lesion_class)),
        "heatmap_auroc": _finite(auroc_from_histograms(hist_pos, hist_neg)),
        "heatmap_auroc_slides": sum(1 for r in per_slide if r["heatmap_auroc"] is not None),
        "heatmap_auroc_by_value": value_aurocs(slides, regions, cfg.stitch),
        "per_slide": per_slide, "wsi_scaat_version": __version__,
        "evaluate": ec.model_dump(mode="json"),
    }  # fmt: skip
    for name in PATCH_METRICS:
        mean, half, n = _ci(np.array(list(rows[name].values()), dtype=np.float64))
        summary[name] = _finite(mean)
        summary[f"{name}_ci95"] = _finite(half)
        summary[f"{name}_n"] = n
    out = Path(out_dir) / "models"
    write_text(out / f"{model}.patches.csv", _patch_csv(model, rows))
    write_json(out / f"{model}.json", summary)
    return summary


def _donors(slides: list[EvalSlide], labels: list[np.ndarray], seed: int) -> torch.Tensor:
    """Up to ``DONORS`` tissue patches of the held-out slides, seeded: the fill of the reconstruction."""
    total = sum(len(lab) for lab in labels)
    pick = np.sort(np.random.default_rng(seed + 1).choice(total, size=min(DONORS, total), replace=False))
    parts, start = [], 0
    for s, lab in zip(slides, labels, strict=True):
        idx = pick[(pick >= start) & (pick < start + len(lab))] - start
        start += len(lab)
        if len(idx):
            with open_store(s.tiles) as tiles:
                parts.append(_read_patches(tiles, idx))
    return torch.cat(parts)


def _patch_csv(model: str, rows: dict[str, dict[tuple[str, int], float]]) -> str:
    keys = sorted({k for values in rows.values() for k in values})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "slide_id", "patch", *PATCH_METRICS])
    for key in keys:
        vals = [rows[m].get(key, float("nan")) for m in PATCH_METRICS]
        w.writerow([model, key[0], key[1], *(f"{v:.6g}" if math.isfinite(v) else "" for v in vals)])
    return buf.getvalue()


def load_summaries(out_dir: str | Path, models: list[str]) -> list[dict[str, Any]]:
    """The per-model summaries written by :func:`evaluate_model`, in ``models`` order."""
    out = []
    for model in models:
        path = Path(out_dir) / "models" / f"{model}.json"
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise EvaluationError(path, f"cannot read the evaluation of {model!r}: {exc}") from None
    return out
