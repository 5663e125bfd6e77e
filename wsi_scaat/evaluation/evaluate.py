"""Evaluation of one trained model on the held-out slides (``wsi-scaat evaluate --model M``).

For every slide of the splits in ``evaluate.splits`` it reads the patch store (labels, lesion
fraction, pixels), the model's saliency store (class probabilities, the maps the workflow exported)
and the stitched heatmap, and measures:

- classification: patch accuracy and AUROC of the stored probabilities against the store's labels,
  on every patch or, with ``evaluate.ignore_band``, on those whose lesion fraction lies outside it
  (mixed patches have ambiguous labels; they still count for localisation);
- complexity, on every patch: Gini sparseness and entropy of the saliency map, Gini also on the
  2 x 2-pooled map; grid artefacts: the odd/even row and column mass balance and the Nyquist energy
  (:mod:`wsi_scaat.metrics.aliasing`);
- localisation, on the patches whose lesion fraction lies in ``evaluate.mixed_fraction`` (default
  0.1-0.9), over their tissue pixels only (the union of ``evaluate.tissue_classes`` of the ground
  truth, or else the tiling's tissue mask; glass is left out), ground truth rasterised from the
  slide's GeoJSON at map resolution: pointing game, relevance mass and rank accuracy, pixel AUROC,
  and relevance mass and AUROC on the 2 x 2-pooled maps; the pixels each rests on are counted;
- faithfulness, on a seeded sample of at most ``evaluate.max_patches`` of the patches whose map
  explains their true class (the saliency store's ``target`` equals the label; half of them lesion
  when there are enough): deletion AUC for the map's order and for a random order, and their gap
  (random minus map: > 0 when the map orders pixels better than chance, whatever the model's general
  sensitivity to blurring), insertion AUC, ROAD (MoRF and LeRF), the reconstruction check, and the
  model-randomisation check (Spearman correlation of the maps of the trained and of a re-initialised
  model; low is good);
- at slide level: the AUROC of the stitched heatmap against the lesion mask inside the tissue, per
  slide and pooled over the slides with lesion; and that of every heatmap value (``stitch.value``),
  blended from the saliency store on a bounded grid (``slide_auroc.value_histograms``).

Writes ``<out>/models/<model>.json`` (the summary), ``<out>/models/<model>.patches.csv`` (one row per
patch: every per-patch value, for paired comparisons) and ``<out>/models/<model>.slides.npz`` (per
slide histograms of heatmap values and class probabilities, for the pooled AUROCs' intervals), each
atomically.
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
from wsi_scaat.annotations import read_annotations
from wsi_scaat.atomic import atomic_output, write_json, write_text
from wsi_scaat.config import Config
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.evaluation.groundtruth import LesionRegion
from wsi_scaat.evaluation.slide_auroc import (
    BINS,
    auroc_from_histograms,
    heatmap_histograms,
    value_histograms,
)
from wsi_scaat.evaluation.statistics import histogram_aggregates
from wsi_scaat.heatmaps.values import VALUES
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
from wsi_scaat.metrics.aliasing import nyquist_energy, parity_balance, pool2, pool2_mask
from wsi_scaat.metrics.randomisation import randomised_copy, spearman
from wsi_scaat.saliency.store import SUFFIX as SALIENCY_SUFFIX
from wsi_scaat.saliency.store import open_saliency_store
from wsi_scaat.store import open_store

PATCH_METRICS = (
    "correct", "gini", "entropy", "gini_pool2", "parity_balance", "nyquist_energy",
    "pointing_game", "relevance_mass", "relevance_rank", "auroc_localisation",
    "relevance_mass_pool2", "auroc_localisation_pool2", "loc_pixels", "loc_lesion_pixels",
    "deletion_auc", "deletion_auc_random", "deletion_gap", "insertion_auc", "road_morf", "road_lerf",
    "reconstruction_kept", "randomisation_spearman",
)  # fmt: skip
HIST_BINS = 1024  # bins of the per-slide histograms kept for the pooled AUROCs' bootstrap
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


def _classified(lesion_fraction: np.ndarray, band: tuple[float, float] | None) -> np.ndarray:
    """Patches scored for classification: all, or those whose lesion fraction is outside ``band``
    (``low < fraction < high``: a label that a threshold of one half makes ambiguous)."""
    lf = np.asarray(lesion_fraction, np.float64)
    if band is None:
        return np.ones(len(lf), bool)
    return ~((lf > band[0]) & (lf < band[1]))


def _tissue_region(cfg: Config, annotations: Path | None) -> LesionRegion | None:
    """The ground truth's tissue (union of ``evaluate.tissue_classes``), or None: use the tissue mask."""
    classes = cfg.evaluate.tissue_classes
    if not classes or annotations is None:
        return None
    return LesionRegion([p for name in classes for p in read_annotations(annotations, name)])


def _mask_pixels(mask: np.ndarray, downsample: float, coords: np.ndarray, size0: float, m: int) -> np.ndarray:
    """(N, m, m) bool: the tissue mask (pixel side ``downsample`` level-0 px) at the map pixels' centres."""
    centre = (np.arange(m, dtype=np.float64) + 0.5) * (size0 / m)
    cols = np.floor((coords[:, 0, None] + centre[None, :]) / downsample).astype(np.int64)
    rows = np.floor((coords[:, 1, None] + centre[None, :]) / downsample).astype(np.int64)
    cols, rows = cols.clip(0, mask.shape[1] - 1), rows.clip(0, mask.shape[0] - 1)
    return mask[rows[:, :, None], cols[:, None, :]] > 0


def _localisation(maps: torch.Tensor, lesion: np.ndarray, tissue: np.ndarray) -> dict[str, torch.Tensor]:
    """Localisation of (B, m, m) maps against lesion masks over tissue pixels, raw and 2 x 2-pooled."""
    gt, valid = torch.from_numpy(lesion), torch.from_numpy(tissue)
    out = {name: fn(maps, gt, valid) for name, fn in LOCALISATION}
    pooled, gt2, valid2 = pool2(maps), pool2_mask(gt & valid), pool2_mask(valid)
    out["relevance_mass_pool2"] = relevance_mass_accuracy(pooled, gt2, valid2)
    out["auroc_localisation_pool2"] = auroc_localisation(pooled, gt2, valid2)
    out["loc_pixels"] = valid.sum((1, 2)).double()
    out["loc_lesion_pixels"] = (gt & valid).sum((1, 2)).double()
    return out


def _random_maps(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Channel-summed |attribution| of ``x`` for ``target`` with the workflow's saliency method."""
    from wsi_scaat.saliency import attribute

    return attribute(model, x, target, cfg.saliency.method, **cfg.saliency.options).abs().sum(1)


def evaluate_model(
    cfg: Config, model: str, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Evaluate ``model`` on the held-out slides; writes ``models/<model>.json``, ``.patches.csv`` and
    ``.slides.npz``."""
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
    labels_all, probs_all, clean_all, targets, eligible = [], [], [], [], []
    hist_pos, hist_neg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    slide_hists = np.zeros((len(slides), 2, 2 * HIST_BINS))  # [heatmap, probability] x [pos | neg]
    value_hists = {v: np.zeros((len(slides), 2 * HIST_BINS)) for v in VALUES}  # each stitch.value's map
    value_pooled = {v: [np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)] for v in VALUES}
    st = cfg.stitch
    value_settings = {"window": st.window, "low_percentile": st.low_percentile,
                      "high_percentile": st.high_percentile, "mask_tissue": st.mask_tissue}  # fmt: skip
    per_slide = []
    low, high = ec.mixed_fraction
    for k, s in enumerate(slides):
        region = LesionRegion.from_geojson(s.annotations, cfg.tiling.annotation_class)
        tissue_region = _tissue_region(cfg, s.annotations)
        with open_store(s.tiles) as tiles:
            labels = tiles.array("labels").astype(np.int64)
            lf = tiles.array("lesion_fraction") if "lesion_fraction" in tiles else labels.astype(np.float32)
            coords, size0 = tiles.coords, float(tiles.attrs["patch_size_level0"])
            tissue_mask = tiles.array("tissue_mask") if "tissue_mask" in tiles else None
            tissue_ds = float(tiles.attrs.get("tissue_downsample", 1.0))
        sal = open_saliency_store(s.saliency)
        probs = sal.array("probs")
        if len(probs) != len(labels):
            raise EvaluationError(s.saliency, f"{len(probs)} patches but the patch store has {len(labels)}")
        clean = _classified(lf, ec.ignore_band)  # patches whose label is not ambiguous
        labels_all.append(labels)
        probs_all.append(probs)
        clean_all.append(clean)
        targets.append(sal.array("target"))
        eligible.append(targets[-1] == labels)  # faithfulness: maps of the patch's true class
        keys_all = [(s.slide_id, i) for i in range(len(labels))]
        correct = np.where(clean, (probs.argmax(1) == labels).astype(float), np.nan)
        rows["correct"].update(zip(keys_all, correct.tolist(), strict=True))
        maps, m = sal.maps, int(sal.attrs["map_size"])
        for a in range(0, len(labels), READ_BATCH):
            b = min(a + READ_BATCH, len(labels))
            batch = _to_tensor(maps[a:b])
            keys = keys_all[a:b]
            for name, fn in (
                ("gini", sparseness_gini), ("entropy", complexity_entropy),
                ("gini_pool2", lambda t: sparseness_gini(pool2(t))),
                ("parity_balance", parity_balance), ("nyquist_energy", nyquist_energy),
            ):  # fmt: skip
                rows[name].update(zip(keys, fn(batch).double().tolist(), strict=True))
            mixed = np.flatnonzero((lf[a:b] >= low) & (lf[a:b] <= high))
            if len(mixed) and not region.empty:
                at = coords[a + mixed]
                gt = region.patch_masks(at, size0, m)
                if tissue_region is not None:
                    tissue = tissue_region.patch_masks(at, size0, m)
                elif tissue_mask is not None:
                    tissue = _mask_pixels(tissue_mask, tissue_ds, at, size0, m)
                else:
                    tissue = np.ones_like(gt)
                sub_keys = [keys[i] for i in mixed]
                for name, v in _localisation(batch[mixed], gt, tissue).items():
                    rows[name].update(zip(sub_keys, v.double().tolist(), strict=True))
        slide_auc = float("nan")
        if not region.empty:
            pos, neg = heatmap_histograms(s.heatmap, s.saliency, region)
            hist_pos += pos
            hist_neg += neg
            slide_auc = auroc_from_histograms(pos, neg)
            slide_hists[k, 0] = np.concatenate([_coarse(pos), _coarse(neg)])
            for value in VALUES:  # every heatmap value, blended from the store on a bounded grid
                vp, vn = value_histograms(s.saliency, region, value, **value_settings)
                value_pooled[value][0] += vp
                value_pooled[value][1] += vn
                value_hists[value][k] = np.concatenate([_coarse(vp), _coarse(vn)])
        p = probs[:, lesion_class].astype(np.float64)
        slide_hists[k, 1] = histogram_aggregates(np.zeros(int(clean.sum()), np.int64), p[clean],
                                                 labels[clean] == lesion_class, 1, HIST_BINS)[0]  # fmt: skip
        per_slide.append(
            {
                "slide_id": s.slide_id,
                "n_patches": len(labels),
                "heatmap_auroc": _finite(slide_auc),
                "accuracy": float(np.nanmean(correct)) if clean.any() else None,
            }
        )
        log(f"{model}: {s.slide_id}: {len(labels)} patches, heatmap AUROC {slide_auc:.3f}")

    chosen = _sample(labels_all, eligible, ec.max_patches, ec.seed)
    donors = _donors(slides, labels_all, ec.seed) if ec.reconstruction else None
    gen = torch.Generator().manual_seed(ec.seed)
    noise = torch.Generator().manual_seed(ec.seed + 7)  # the random deletion order, same for every model
    twin = randomised_copy(net, ec.seed) if ec.randomisation else None
    for s, idx, target_all in zip(slides, chosen, targets, strict=True):
        if not len(idx):  # most slides of a large cohort: not opened again
            continue
        sal = open_saliency_store(s.saliency)
        with open_store(s.tiles) as tiles:
            for a in range(0, len(idx), ec.batch_size):
                sel = idx[a : a + ec.batch_size]
                x = _read_patches(tiles, sel)
                attr = _maps_for(_to_tensor(sal.maps.get_orthogonal_selection((sel,))), x.shape[-1])
                target = torch.from_numpy(target_all[sel]).long()
                keys = [(s.slide_id, int(i)) for i in sel]
                x, attr_d, target_d = x.to(dev), attr.to(dev), target.to(dev)
                order = torch.rand(attr.shape, generator=noise).to(dev)
                steps = ec.deletion_steps
                values = {
                    "deletion_auc": deletion_auc(net, x, attr_d, target_d, steps=steps),
                    "deletion_auc_random": deletion_auc(net, x, order, target_d, steps=steps),
                    "insertion_auc": insertion_auc(net, x, attr_d, target_d, steps=steps),
                }
                values["deletion_gap"] = values["deletion_auc_random"] - values["deletion_auc"]
                if ec.road:
                    for name, direction in (("road_morf", "morf"), ("road_lerf", "lerf")):
                        values[name] = road_auc(net, x, attr_d, target_d, percentages=ec.road_percentages,
                                                order=direction, seed=ec.seed)  # fmt: skip
                if donors is not None:
                    rec = reconstruction_check(
                        net,
                        x,
                        attr_d,
                        donors.to(dev),
                        keep=ec.reconstruction_keep,
                        seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
                    )
                    values["reconstruction_kept"] = rec.unchanged[:, 0].double()
                if twin is not None:
                    trained = _random_maps(net, x, target_d, cfg)
                    values["randomisation_spearman"] = spearman(trained, _random_maps(twin, x, target_d, cfg))
                for name, v in values.items():
                    rows[name].update(zip(keys, v.detach().double().cpu().tolist(), strict=True))
        log(f"{model}: {s.slide_id}: faithfulness on {len(idx)} patches")

    clean_cat = np.concatenate(clean_all)
    labels_cat = np.concatenate(labels_all)[clean_cat]
    probs_cat = np.concatenate(probs_all)[clean_cat]
    method, knobs = strength_label(cfg, model)
    run, seed = cfg.run_of(model)
    summary: dict[str, Any] = {
        "model": model, "run": run, "seed": seed, "method": method, "knobs": knobs, "checkpoint": str(ckpt),
        "saliency_method": cfg.saliency.method, "saliency_target": cfg.saliency.target,
        "splits": list(ec.splits), "n_slides": len(slides), "n_patches": int(len(clean_cat)),
        "n_classified": int(clean_cat.sum()), "ignore_band": ec.ignore_band,
        "accuracy": float((probs_cat.argmax(1) == labels_cat).mean()) if len(labels_cat) else None,
        "auroc": _finite(auroc(probs_cat[:, lesion_class], labels_cat == lesion_class)),
        "heatmap_auroc": _finite(auroc_from_histograms(hist_pos, hist_neg)),
        "heatmap_auroc_slides": sum(1 for r in per_slide if r["heatmap_auroc"] is not None),
        "heatmap_auroc_by_value": {v: _finite(auroc_from_histograms(*value_pooled[v])) for v in VALUES},
        "per_slide": per_slide, "wsi_scaat_version": __version__,
        "evaluate": ec.model_dump(mode="json"),
    }  # fmt: skip
    for name in PATCH_METRICS:
        mean, half, n = _ci(np.array(list(rows[name].values()), dtype=np.float64))
        summary[name] = _finite(mean)
        summary[f"{name}_ci95"] = _finite(half)
        summary[f"{name}_n"] = n
    for name in ("loc_pixels", "loc_lesion_pixels"):  # what the localisation figures rest on: totals
        summary[f"{name}_total"] = int(np.nansum(list(rows[name].values())))
    out = Path(out_dir) / "models"
    write_text(out / f"{model}.patches.csv", _patch_csv(model, rows))
    with atomic_output(out / f"{model}.slides.npz") as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, slide_ids=np.array([s.slide_id for s in slides]), heatmap=slide_hists[:, 0],
                            probability=slide_hists[:, 1],
                            **{f"heatmap_{v}": value_hists[v] for v in VALUES})  # fmt: skip
    write_json(out / f"{model}.json", summary)
    return summary


def _coarse(hist: np.ndarray) -> np.ndarray:
    """A ``BINS`` histogram summed into ``HIST_BINS`` bins."""
    return np.asarray(hist, np.float64).reshape(HIST_BINS, -1).sum(1)


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
