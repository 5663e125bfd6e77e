"""The evaluation's outputs for people: ``metrics.csv``, ``metrics.md``, the figure grid and the
trade-off plot, built from the per-model summaries of :mod:`wsi_scaat.evaluation.evaluate`."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from wsi_scaat.atomic import atomic_output, write_text
from wsi_scaat.config import Config
from wsi_scaat.evaluation.evaluate import PATCH_METRICS, eval_slides, load_summaries
from wsi_scaat.evaluation.groundtruth import LesionRegion
from wsi_scaat.evaluation.slide_auroc import EVAL_MAX_SIDE
from wsi_scaat.heatmaps.values import VALUES

# (key, column title, True when higher is better) of the markdown table, in order.
COLUMNS = (
    ("accuracy", "accuracy", True),
    ("auroc", "AUROC", True),
    ("gini", "Gini", True),
    ("entropy", "entropy", False),
    ("deletion_auc", "deletion AUC", False),
    ("insertion_auc", "insertion AUC", True),
    ("road_morf", "ROAD MoRF", False),
    ("road_lerf", "ROAD LeRF", True),
    ("reconstruction_kept", "reconstruction kept", True),
    ("pointing_game", "pointing game", True),
    ("relevance_mass", "relevance mass", True),
    ("relevance_rank", "relevance rank", True),
    ("auroc_localisation", "patch loc. AUROC", True),
    ("heatmap_auroc", "slide heatmap AUROC", True),
    *((f"heatmap_auroc_{v}", f"slide AUROC: {v}", True) for v in VALUES),
)
CSV_FIELDS = [
    *("model", "method", "knobs", "n_slides", "n_patches", "accuracy", "auroc", "heatmap_auroc"),
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
    """One row per model: every figure of the summaries, with 95% half-widths and counts."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for s in map(_flat, summaries):
        w.writerow({k: ("" if s.get(k) is None else s.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def metrics_markdown(summaries: list[dict[str, Any]], stitched_value: str | None = None) -> str:
    """A markdown table (one row per model; best value of each column in bold) and its legend;
    ``stitched_value``: the ``stitch.value`` of the stitched heatmaps, for the legend."""
    summaries = [_flat(s) for s in summaries]
    head = ["model", *(f"{title} {'↑' if up else '↓'}" for _, title, up in COLUMNS)]
    best = {}
    for key, _, up in COLUMNS:
        vals = [s.get(key) for s in summaries if isinstance(s.get(key), float | int)]
        if len(vals) > 1:
            best[key] = max(vals) if up else min(vals)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        name = s["model"] + (f" ({s['knobs']})" if s.get("knobs") else "")
        cells = [name]
        for key, _, _ in COLUMNS:
            text = _fmt(s.get(key))
            if s.get(f"{key}_ci95") is not None:
                text += f" ± {_fmt(s[f'{key}_ci95'])}"
            if key in best and s.get(key) == best[key]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    first = summaries[0] if summaries else {}
    n = {k: first.get(f"{k}_n") for k in ("gini", "pointing_game", "deletion_auc")}
    lines += [
        "",
        f"Held-out slides: {first.get('n_slides')} (splits {', '.join(first.get('splits', []))}), "
        f"{first.get('n_patches')} patches; saliency: {first.get('saliency_method')} of class "
        f"'{first.get('saliency_target')}'. ± is the 95% normal-approximation interval over patches. "
        f"Complexity on every patch (n = {n['gini']}), localisation on the patches holding lesion "
        f"(n = {n['pointing_game']}), faithfulness and reconstruction on a seeded sample of patches whose "
        f"map explains their true class (n = {n['deletion_auc']}). The slide heatmap AUROC pools the "
        f"tissue pixels of the held-out slides with lesion"
        + (f" (stitched heatmap: stitch.value = {stitched_value})" if stitched_value else "")
        + "; the 'slide AUROC: <value>' columns measure each heatmap value the same way, blended from the "
        f"saliency store on a grid of at most {EVAL_MAX_SIDE} px a side: saliency (|attribution|), "
        "evidence (attribution > 0), weighted (saliency x p(target)) and probability (p(target) over each "
        "patch, the baseline a saliency heatmap must beat). ↑: higher is better; ↓: lower is better; "
        "bold: best of the column.",
    ]
    return "\n".join(lines) + "\n"


def _normalise(m: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(m, 99)) if m.size else 0.0
    return np.clip(m / hi, 0, 1) if hi > 0 else np.zeros_like(m)


def pick_figure_patches(cfg: Config, model: str, n: int) -> list[tuple[str, int, float]]:
    """(slide_id, patch, lesion fraction) of ``n`` held-out patches for the figure grid: lesion
    borders first (fraction closest to one half), then the most lesion, deterministic."""
    from wsi_scaat.store import open_store

    found = []
    for s in eval_slides(cfg, model):
        with open_store(s.tiles) as tiles:
            lf = tiles.array("lesion_fraction") if "lesion_fraction" in tiles else tiles.array("labels")
        found += [(abs(float(v) - 0.5), s.slide_id, int(i), float(v)) for i, v in enumerate(lf) if v > 0]
    found.sort()
    return [(sid, i, v) for _, sid, i, v in found[:n]]


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


def tradeoff_plot(summaries: list[dict[str, Any]], out: Path) -> Path:
    """2 x 2 scatter, one point per model: Gini and deletion AUC against accuracy and heatmap AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 7.5))
    methods = sorted({s["method"] for s in summaries})
    colors = {m: plt.get_cmap("tab10")(k) for k, m in enumerate(methods)}
    for (r, ykey, ylabel), (c, xkey, xlabel) in (
        (yy, xx)
        for yy in ((0, "gini", "Gini sparseness ↑"), (1, "deletion_auc", "deletion AUC ↓"))
        for xx in ((0, "accuracy", "patch accuracy ↑"), (1, "heatmap_auroc", "slide heatmap AUROC ↑"))
    ):
        ax = axes[r, c]
        for s in summaries:
            x, y = s.get(xkey), s.get(ykey)
            if x is None or y is None:
                continue
            ax.scatter(
                [x],
                [y],
                color=colors[s["method"]],
                s=30,
                label=s["method"] if s["method"] not in ax.get_legend_handles_labels()[1] else None,
            )
            ax.annotate(s["model"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Trade-offs: one point per trained model (held-out slides)")
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def write_report(cfg: Config, out_dir: str | Path, models: list[str]) -> dict[str, Path]:
    """metrics.csv, metrics.md, figure_grid.png and tradeoff.png of ``models`` in ``out_dir``."""
    out_dir = Path(out_dir)
    summaries = load_summaries(out_dir, models)
    write_text(out_dir / "metrics.csv", metrics_csv(summaries))
    write_text(out_dir / "metrics.md", metrics_markdown(summaries, cfg.stitch.value))
    return {
        "csv": out_dir / "metrics.csv",
        "markdown": out_dir / "metrics.md",
        "figure_grid": figure_grid(cfg, models, out_dir / "figure_grid.png"),
        "tradeoff": tradeoff_plot(summaries, out_dir / "tradeoff.png"),
    }
