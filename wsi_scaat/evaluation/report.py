"""The evaluation's outputs for people: ``metrics.csv``, ``metrics.md``, the figure grid and the
trade-off plot, built from the per-model summaries of :mod:`wsi_scaat.evaluation.evaluate`."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_scaat.atomic import atomic_output, write_text
from wsi_scaat.config import Config
from wsi_scaat.evaluation.evaluate import PATCH_METRICS, eval_slides, load_summaries
from wsi_scaat.evaluation.groundtruth import LesionRegion
from wsi_scaat.evaluation.slide_auroc import EVAL_MAX_SIDE
from wsi_scaat.evaluation.statistics import (
    Interval,
    auroc_statistic,
    bootstrap,
    mean_statistic,
    patch_aggregates,
)
from wsi_scaat.heatmaps.values import VALUES

# (key, column title, True when higher is better, statistic) of the tables, in order. "mean": mean of a
# per-patch value; "auroc:<histogram>": pooled AUROC of the per-slide histograms of <model>.slides.npz.
COLUMNS = (
    ("accuracy", "accuracy", True, "mean:correct"),
    ("auroc", "AUROC", True, "auroc:probability"),
    ("gini", "Gini", True, "mean:gini"),
    ("gini_pool2", "Gini 2x2", True, "mean:gini_pool2"),
    ("parity_balance", "row/col balance", True, "mean:parity_balance"),
    ("deletion_gap", "deletion gap", True, "mean:deletion_gap"),
    ("deletion_auc", "deletion AUC", False, "mean:deletion_auc"),
    ("insertion_auc", "insertion AUC", True, "mean:insertion_auc"),
    ("road_morf", "ROAD MoRF", False, "mean:road_morf"),
    ("randomisation_spearman", "randomisation ρ", False, "mean:randomisation_spearman"),
    ("auroc_localisation", "loc. AUROC", True, "mean:auroc_localisation"),
    ("auroc_localisation_pool2", "loc. AUROC 2x2", True, "mean:auroc_localisation_pool2"),
    ("relevance_mass", "relevance mass", True, "mean:relevance_mass"),
    ("pointing_game", "pointing game", True, "mean:pointing_game"),
    ("heatmap_auroc", "slide heatmap AUROC", True, "auroc:heatmap"),
    *((f"heatmap_auroc_{v}", f"slide AUROC: {v}", True, f"auroc:heatmap_{v}") for v in VALUES),
)
CSV_FIELDS = [
    *(
        "model",
        "run",
        "seed",
        "method",
        "knobs",
        "n_slides",
        "n_patches",
        "n_classified",
        "accuracy",
        "auroc",
    ),
    *("heatmap_auroc", "loc_pixels_total", "loc_lesion_pixels_total"),
    *(f"heatmap_auroc_{v}" for v in VALUES),
    *PATCH_METRICS,
    *(f"{m}_ci95" for m in PATCH_METRICS),
    *(f"{m}_n" for m in PATCH_METRICS),
]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _flat(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with ``heatmap_auroc_by_value`` spread into ``heatmap_auroc_<value>`` keys."""
    by_value = summary.get("heatmap_auroc_by_value") or {}
    return summary | {f"heatmap_auroc_{v}": by_value.get(v) for v in VALUES}


def metrics_csv(summaries: list[dict[str, Any]]) -> str:
    """One row per model: every figure of the summaries, with 95% half-widths (over patches) and counts."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for s in map(_flat, summaries):
        w.writerow({k: ("" if s.get(k) is None else s.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


@dataclass
class ModelData:
    """What the bootstrap needs of one model: per-slide aggregates of every column's statistic."""

    name: str
    aggregates: dict[str, np.ndarray]  # column key -> (n_slides, F)


def load_model_data(out_dir: Path, model: str, slide_ids: list[str]) -> ModelData:
    """Per-slide aggregates of ``model`` from its ``patches.csv`` and ``slides.npz``."""
    index = {sid: k for k, sid in enumerate(slide_ids)}
    folder = out_dir / "models"
    with (folder / f"{model}.patches.csv").open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    slide = np.array([index[r["slide_id"]] for r in table], dtype=np.int64)
    aggs: dict[str, np.ndarray] = {}
    hists = np.load(folder / f"{model}.slides.npz")
    order = [list(hists["slide_ids"]).index(sid) for sid in slide_ids]
    for key, _, _, stat in COLUMNS:
        kind, source = stat.split(":")
        if kind == "mean":
            values = np.array(
                [float(r[source]) if r.get(source) not in (None, "") else np.nan for r in table]
            )
            aggs[key] = patch_aggregates(slide, values, len(slide_ids))
        else:
            aggs[key] = np.asarray(hists[source], np.float64)[order]
    return ModelData(model, aggs)


def _stat(key: str):
    return auroc_statistic if dict((c[0], c[3]) for c in COLUMNS)[key].startswith("auroc") else mean_statistic


@dataclass
class RunRow:
    """One run of the tables: its seeds' models and, per column, the estimate and the paired difference."""

    run: str
    label: str
    models: list[str]
    values: dict[str, Interval]
    differences: dict[str, Interval]


def run_rows(cfg: Config, out_dir: Path, summaries: list[dict[str, Any]]) -> list[RunRow]:
    """Per run: the mean over seeds of every column with its bootstrap interval, and the paired
    difference to ``evaluate.reference`` (resampling held-out slides and seeds)."""
    ec = cfg.evaluate
    slide_ids = [r["slide_id"] for r in summaries[0]["per_slide"]]
    by_model = {s["model"]: s for s in summaries}
    data = {m: load_model_data(out_dir, m, slide_ids) for m in by_model}
    runs = [r for r in cfg.runs if all(m in data for m in cfg.replicates(r))]
    reference = ec.reference if ec.reference in runs else None
    rows = []
    for run in runs:
        models = cfg.replicates(run)
        first = by_model[models[0]]
        label = run + (f" ({first['knobs']})" if first.get("knobs") else "")
        values, diffs = {}, {}
        for key, *_ in COLUMNS:
            aggs = [data[m].aggregates[key] for m in models]
            values[key] = bootstrap(aggs, _stat(key), n_boot=ec.bootstrap, seed=ec.seed)
            if reference is not None and run != reference:
                ref = [data[m].aggregates[key] for m in cfg.replicates(reference)]
                diffs[key] = bootstrap(aggs, _stat(key), ref, n_boot=ec.bootstrap, seed=ec.seed)
        rows.append(RunRow(run, label, models, values, diffs))
    return rows


def runs_csv(rows: list[RunRow]) -> str:
    """One row per run: per column, estimate and 95% interval, and the paired difference to the reference."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["run", "n_seeds", "models"]
    for key, *_ in COLUMNS:
        head += [key, f"{key}_low", f"{key}_high", f"{key}_diff", f"{key}_diff_low", f"{key}_diff_high"]
    w.writerow(head)
    for r in rows:
        line: list[Any] = [r.run, len(r.models), " ".join(r.models)]
        for key, *_ in COLUMNS:
            v, d = r.values[key], r.differences.get(key)
            line += [f"{x:.6g}" for x in (v.estimate, v.low, v.high)]
            line += [f"{x:.6g}" for x in (d.estimate, d.low, d.high)] if d else ["", "", ""]
        w.writerow(line)
    return buf.getvalue()


def metrics_markdown(cfg: Config, rows: list[RunRow], summaries: list[dict[str, Any]]) -> str:
    """Two markdown tables (runs with 95% intervals; paired differences to the reference) and a legend."""
    ec = cfg.evaluate
    keys = [c for c in COLUMNS if any(np.isfinite(r.values[c[0]].estimate) for r in rows)]
    head = ["run", "seeds", *(f"{title} {'↑' if up else '↓'}" for _, title, up, _ in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {}
    for key, _, up, _ in keys:
        vals = [r.values[key].estimate for r in rows if np.isfinite(r.values[key].estimate)]
        if len(vals) > 1:
            best[key] = max(vals) if up else min(vals)
    for r in rows:
        cells = [r.label, str(len(r.models))]
        for key, *_ in keys:
            v = r.values[key]
            text = _fmt(v.estimate) + (f" [{_fmt(v.low)}, {_fmt(v.high)}]" if np.isfinite(v.low) else "")
            cells.append(f"**{text}**" if best.get(key) == v.estimate else text)
        lines.append("| " + " | ".join(cells) + " |")
    diff_rows = [r for r in rows if r.differences]
    if diff_rows:
        ref = ec.reference
        lines += ["", f"Paired difference to `{ref}` (run minus {ref}; *: the 95% interval excludes 0):", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in diff_rows:
            cells = [r.label, str(len(r.models))]
            for key, *_ in keys:
                d = r.differences[key]
                mark = "*" if d.excludes_zero else ""
                cells.append(f"{d.estimate:+.3f}{mark} [{d.low:+.3f}, {d.high:+.3f}]" if np.isfinite(d.low)
                             else _fmt(d.estimate))  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    first = summaries[0] if summaries else {}
    n = {
        k: first.get(f"{k}_n")
        for k in ("gini", "auroc_localisation", "deletion_auc", "randomisation_spearman")
    }
    lines += [
        "",
        f"Held-out slides: {first.get('n_slides')} (splits {', '.join(first.get('splits', []))}), "
        f"{first.get('n_patches')} patches"
        + (
            f" (accuracy and AUROC on the {first.get('n_classified')} whose lesion fraction is outside "
            f"{first['ignore_band'][0]:g}-{first['ignore_band'][1]:g}: mixed patches have ambiguous labels)"
            if first.get("ignore_band")
            else ""
        )
        + f"; saliency: {first.get('saliency_method')} of class "
        f"'{first.get('saliency_target')}'. Values: mean over the seeds of each run; [ ]: 95% bootstrap "
        f"interval ({ec.bootstrap} replicates resampling held-out slides, and each run's seeds; paired "
        f"differences resample the same slides for both runs). Complexity on every patch (n = {n['gini']}); "
        f"Gini 2x2 and loc. AUROC 2x2 on 2 x 2-pooled maps; row/col balance: the smaller odd/even mass "
        f"ratio of rows and columns (1: no grid artefact). Localisation on the patches with lesion fraction "
        f"{ec.mixed_fraction[0]:g}-{ec.mixed_fraction[1]:g} (n = {n['auroc_localisation']} of the first "
        f"model), over their tissue pixels only ({first.get('loc_pixels_total')} pixels, "
        f"{first.get('loc_lesion_pixels_total')} of them lesion). Faithfulness on a seeded sample of "
        f"patches whose map explains their true class (n = {n['deletion_auc']}); deletion gap: deletion "
        f"AUC for a random pixel order minus for the map's order (higher: the map orders pixels better "
        f"than chance). Randomisation ρ: Spearman correlation of the maps of the model and of the same "
        f"architecture re-initialised (n = {n['randomisation_spearman']}; lower: the maps depend on what "
        f"was learned). The slide heatmap AUROC pools the tissue pixels of the held-out slides with "
        f"lesion (stitched heatmap: stitch.value = {cfg.stitch.value}); the 'slide AUROC: <value>' columns "
        f"measure each heatmap value the same way, blended from the saliency store on a grid of at most "
        f"{EVAL_MAX_SIDE} px a side: saliency (|attribution|), evidence (attribution > 0), weighted "
        "(saliency x p(target)) and probability (p(target) over each patch, the baseline a saliency "
        "heatmap must beat). ↑: higher is better; ↓: lower is better; bold: best of the column.",
    ]
    return "\n".join(lines) + "\n"


def _normalise(m: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(m, 99)) if m.size else 0.0
    return np.clip(m / hi, 0, 1) if hi > 0 else np.zeros_like(m)


def pick_figure_patches(cfg: Config, model: str, n: int) -> list[tuple[str, int, float]]:
    """(slide_id, patch, lesion fraction) of ``n`` held-out patches for the figure grid: lesion
    borders first (fraction closest to one half), then the most lesion, deterministic."""
    import heapq
    from collections.abc import Iterator

    from wsi_scaat.store import open_store

    # each store read once; only the best n kept, whatever the size of the cohort
    def candidates() -> Iterator[tuple[float, str, int, float]]:
        for s in eval_slides(cfg, model):
            with open_store(s.tiles) as tiles:
                lf = tiles.array("lesion_fraction") if "lesion_fraction" in tiles else tiles.array("labels")
            for i, v in enumerate(lf):
                if v > 0:
                    yield abs(float(v) - 0.5), s.slide_id, i, float(v)

    return [(sid, i, v) for _, sid, i, v in heapq.nsmallest(n, candidates())]


def figure_grid(cfg: Config, models: list[str], out: Path) -> Path:
    """PNG grid: one row per picked patch; columns patch, ground truth, then each model's map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsi_scaat.saliency.store import open_saliency_store
    from wsi_scaat.store import open_store

    picks = pick_figure_patches(cfg, models[0], cfg.evaluate.figure_patches)
    slides = {s.slide_id: s for s in eval_slides(cfg, models[0])}
    rows, cols = max(1, len(picks)), 2 + len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.8 * rows), squeeze=False)
    for r, (sid, i, frac) in enumerate(picks):
        s = slides[sid]
        with open_store(s.tiles) as tiles:
            patch = np.asarray(tiles.imgs[i])
            coords, size0 = tiles.coords[i : i + 1], float(tiles.attrs["patch_size_level0"])
        region = LesionRegion.from_geojson(s.annotations, cfg.tiling.annotation_class)
        panels = [(patch, None, f"{sid} #{i}"), (None, None, f"lesion {frac:.0%}")]
        for model in models:
            sal = open_saliency_store(cfg.results / "saliency" / model / s.saliency.name)
            panels.append((None, _normalise(np.asarray(sal.maps[i], dtype=np.float32)), model))
        m = int(open_saliency_store(s.saliency).attrs["map_size"])
        panels[1] = (None, region.patch_masks(coords, size0, m)[0].astype(np.float32), panels[1][2])
        for c, (rgb, values, title) in enumerate(panels):
            ax = axes[r, c]
            if rgb is not None:
                ax.imshow(rgb)
            else:
                ax.imshow(values, cmap="gray" if c == 1 else "inferno", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or c < 2:
                ax.set_title(title, fontsize=7)
    fig.suptitle("Held-out patches: image, ground truth, saliency of each model (99th-percentile scaled)",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


TRADEOFF_PANELS = (
    ("accuracy", "deletion_gap"),
    ("accuracy", "auroc_localisation"),
    ("deletion_gap", "auroc_localisation"),
    ("accuracy", "gini_pool2"),
)


def tradeoff_plot(cfg: Config, rows: list[RunRow], out: Path) -> Path:
    """2 x 2 scatter, one point per run (mean over seeds, 95% bootstrap intervals as error bars):
    accuracy, deletion gap, tissue localisation AUROC and pooled Gini against each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsi_scaat.evaluation.evaluate import strength_label

    titles = {key: f"{title} {'↑' if up else '↓'}" for key, title, up, _ in COLUMNS}
    method = {r.run: strength_label(cfg, r.models[0])[0] for r in rows}
    methods = sorted(set(method.values()))
    colors = {m: plt.get_cmap("tab10")(k) for k, m in enumerate(methods)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for ax, (xkey, ykey) in zip(axes.flat, TRADEOFF_PANELS, strict=True):
        for r in rows:
            x, y = r.values[xkey], r.values[ykey]
            if not (np.isfinite(x.estimate) and np.isfinite(y.estimate)):
                continue
            xerr = [[x.estimate - x.low], [x.high - x.estimate]] if np.isfinite(x.low) else None
            yerr = [[y.estimate - y.low], [y.high - y.estimate]] if np.isfinite(y.low) else None
            m = method[r.run]
            seen = ax.get_legend_handles_labels()[1]
            ax.errorbar([x.estimate], [y.estimate], xerr=xerr, yerr=yerr, fmt="o", ms=4, color=colors[m],
                        elinewidth=0.8, capsize=2, label=m if m not in seen else None)  # fmt: skip
            ax.annotate(
                r.run, (x.estimate, y.estimate), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel(titles[xkey])
        ax.set_ylabel(titles[ykey])
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Trade-offs on the held-out slides: one point per run, mean over seeds, 95% intervals")
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def write_report(cfg: Config, out_dir: str | Path, models: list[str]) -> dict[str, Path]:
    """metrics.csv (per model), runs.csv and metrics.md (per run, with intervals), figure_grid.png and
    tradeoff.png of ``models`` in ``out_dir``."""
    out_dir = Path(out_dir)
    summaries = load_summaries(out_dir, models)
    rows = run_rows(cfg, out_dir, summaries)
    write_text(out_dir / "metrics.csv", metrics_csv(summaries))
    write_text(out_dir / "runs.csv", runs_csv(rows))
    write_text(out_dir / "metrics.md", metrics_markdown(cfg, rows, summaries))
    primary = [m for m in models if m in cfg.runs]
    return {
        "csv": out_dir / "metrics.csv",
        "runs": out_dir / "runs.csv",
        "markdown": out_dir / "metrics.md",
        "figure_grid": figure_grid(cfg, primary or models, out_dir / "figure_grid.png"),
        "tradeoff": tradeoff_plot(cfg, rows, out_dir / "tradeoff.png"),
    }
