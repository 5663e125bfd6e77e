"""The run summary: how far each slide of a cohort got, and why it stopped.

``<results>/<cohort>/run_summary.csv`` has one row per slide and model (one row with an empty
model when the slide stops before any model stage, or is not explained at all), with columns:

- ``slide_id``, ``path``, ``model``;
- ``status``: ``ok`` (every stage's outputs exist), ``failed`` (a stage's log holds an error),
  ``incomplete`` (a stage started, left no output and no error: killed, or still running) or
  ``not run`` (a stage has neither outputs nor a log: not requested yet, or an upstream job such
  as the model's training failed);
- ``stage``: the first stage that is not ok (``tile``, ``saliency``, ``stitch``, ``export``);
- ``reason``: one line, the job's ``wsi-scaat: error:`` message without the prefix;
- ``warnings``: warnings the package logged on the way (e.g. an annotation repaired with
  ``make_valid``), ``stage: message`` joined by `` | ``.

Everything is read from the stage outputs and logs under the results folder (the layout of
``pipelines/*.smk``), so the summary can be rebuilt at any time with ``wsi-scaat summarize``; the
workflow writes it at the end of every run, failed or not. For a cohort of thousands of slides it
lists each folder once and reads each log at most once (a slide's tile log serves all its models, a
model's training log all its slides); slides without outputs or logs cost no file access.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from wsi_scaat.atomic import write_text
from wsi_scaat.config import Config
from wsi_scaat.manifest import SlideEntry

FILE_NAME = "run_summary.csv"
STAGES = ("tile", "saliency", "stitch", "export")
ERROR_PREFIX = "wsi-scaat: error: "
#: Longest reason kept (a library's message can be long even on one line).
MAX_REASON = 500
#: A Python warning as ``warnings`` prints it, raised from a module of this package.
_WARNING_RE = re.compile(r"^(?P<src>.*\bwsi_scaat\b.*):\d+: (?P<cat>\w*Warning): (?P<msg>.+)$")
# Suffixes of the export stage's outputs (see wsi_scaat.heatmaps.export.OUTPUTS).
_EXPORT_SUFFIXES = (
    ".heatmap.ome.tif",
    ".heatmap_rgb.ome.tif",
    ".thumbnail.png",
    ".heatmap.png",
    ".overlay.png",
    ".figure.png",
    ".tiles.geojson",
    ".regions.geojson",
)


@dataclass(frozen=True)
class SummaryRow:
    """One line of the run summary."""

    slide_id: str
    path: str
    model: str
    status: str
    stage: str
    reason: str
    warnings: str


COLUMNS = tuple(f.name for f in fields(SummaryRow))


def _one_line(text: str, limit: int = MAX_REASON) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_log(log: Path) -> list[str]:
    try:
        return [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return []


def log_error(log: Path) -> str | None:
    """The one-line cause of a failed job from its log; None when the log shows no error.

    The CLI's ``wsi-scaat: error: <file>: <cause>`` line (the last one, without the prefix), else
    the last line of a traceback.
    """
    return _error(_read_log(log))


def log_warnings(log: Path) -> list[str]:
    """The package's warnings in a log, one line each (``Category: message``), in order, once each."""
    return _warnings(_read_log(log))


def _error(lines: list[str]) -> str | None:
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    if errors:
        return _one_line(errors[-1][len(ERROR_PREFIX) :])
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return _one_line(lines[-1])
    return None


def _warnings(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        match = _WARNING_RE.match(line)
        if match:
            text = _one_line(f"{match['cat']}: {match['msg']}")
            if text not in out:
                out.append(text)
    return out


@dataclass(frozen=True)
class _Stage:
    name: str
    outputs: tuple[Path, ...]
    log: Path


class _Results:
    """The results folder as the summary reads it: each folder listed once, each log read once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._names: dict[Path, frozenset[str]] = {}
        self._logs: dict[Path, tuple[str | None, list[str]]] = {}
        self._models: dict[str, str | None] = {}

    def exists(self, path: Path) -> bool:
        """Whether ``path`` is there (an entry of its folder's listing)."""
        folder = path.parent
        names = self._names.get(folder)
        if names is None:
            try:
                names = frozenset(os.listdir(folder))
            except OSError:
                names = frozenset()
            self._names[folder] = names
        return path.name in names

    def done(self, stage: _Stage) -> bool:
        return all(self.exists(p) for p in stage.outputs)

    def log(self, path: Path) -> tuple[str | None, list[str]]:
        """(error, warnings) of a job's log (None, [] when there is none)."""
        if path not in self._logs:
            lines = _read_log(path) if self.exists(path) else []
            self._logs[path] = (_error(lines), _warnings(lines))
        return self._logs[path]

    def model_missing(self, model: str) -> str | None:
        if model not in self._models:
            self._models[model] = _model_missing(self.cfg, model)
        return self._models[model]


def _stages(cfg: Config, slide_id: str, model: str | None) -> list[_Stage]:
    root, sid = cfg.results, slide_id
    tile_suffixes = (f".{cfg.tiling.format}", ".tissue.png", ".tissue.geojson")
    out = [_Stage("tile", tuple(root / "tiles" / f"{sid}{s}" for s in tile_suffixes),
                  root / "logs" / "tile" / f"{sid}.log")]  # fmt: skip
    if model is None:
        return out
    outputs = {
        "saliency": (root / "saliency" / model / f"{sid}.saliency.zarr",),
        "stitch": (root / "heatmaps" / model / f"{sid}.heatmap.zarr",),
        "export": tuple(root / "export" / model / f"{sid}{s}" for s in _EXPORT_SUFFIXES),
    }
    return out + [
        _Stage(name, paths, root / "logs" / name / model / f"{sid}.log") for name, paths in outputs.items()
    ]


def _rel(cfg: Config, path: Path) -> str:
    try:
        return str(path.relative_to(cfg.results))
    except ValueError:
        return str(path)


def _model_missing(cfg: Config, model: str) -> str | None:
    """Why the checkpoint of ``model`` is not there, or None when it is."""
    if cfg.model_checkpoint is not None:
        found = Path(cfg.model_checkpoint).is_file()
        return None if found else f"{cfg.model_checkpoint}: checkpoint not found"
    if (cfg.results / "models" / model / "best.pt").is_file():
        return None
    log = cfg.results / "logs" / "train" / f"{model}.log"
    cause = log_error(log)
    if cause:
        return f"model {model!r} failed to train: {cause}"
    return f"model {model!r} is not trained (see {_rel(cfg, log)})"


def _explained(cfg: Config, entry: SlideEntry) -> bool:
    splits = getattr(cfg.saliency, "splits", None)
    return splits is None or entry.split in splits


def _walk(results: _Results, entry: SlideEntry, model: str | None) -> SummaryRow:
    """Status of one slide through the stages of one model (tile only when ``model`` is None)."""
    cfg = results.cfg
    warnings: list[str] = []
    status, stage_name, reason = "ok", "", ""
    for stage in _stages(cfg, entry.slide_id, model):
        cause, logged = results.log(stage.log)
        warnings += [f"{stage.name}: {w}" for w in logged]
        if results.done(stage):
            continue
        stage_name = stage.name
        if cause is not None:
            status, reason = "failed", cause
        elif results.exists(stage.log):
            status, reason = "incomplete", f"no output and no error in {_rel(cfg, stage.log)} (killed?)"
        else:
            missing = results.model_missing(model) if stage.name == "saliency" and model else None
            status, reason = "not run", missing or "no output yet (not requested, or stopped before it)"
        break
    return SummaryRow(entry.slide_id, str(entry.path), model or "", status, stage_name, reason,
                      " | ".join(warnings))  # fmt: skip


def collect(cfg: Config, slides: Iterable[SlideEntry]) -> list[SummaryRow]:
    """Summary rows of ``slides`` under ``cfg``'s results folder, in manifest order."""
    results = _Results(cfg)
    rows: list[SummaryRow] = []
    for entry in slides:
        tile = _walk(results, entry, None)
        if tile.status != "ok" or not _explained(cfg, entry):
            rows.append(tile)
            continue
        rows += [_walk(results, entry, model) for model in cfg.runs]  # per-slide exports: first seeds
    return rows


def to_csv(rows: Iterable[SummaryRow]) -> str:
    """The rows as CSV text with a header line."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(astuple(row) for row in rows)
    return buf.getvalue()


def write_summary(cfg: Config, slides: Iterable[SlideEntry]) -> tuple[Path, list[SummaryRow]]:
    """Write ``<results>/<cohort>/run_summary.csv`` atomically; returns its path and rows."""
    rows = collect(cfg, slides)
    path = cfg.results / FILE_NAME
    write_text(path, to_csv(rows))
    return path, rows


def describe(path: Path, rows: list[SummaryRow]) -> str:
    """One line: where the summary is and how many rows have each status."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no slides"
    return f"run summary: {path} ({parts})"


def problem_lines(rows: list[SummaryRow], limit: int = 20) -> list[str]:
    """The rows that are not ok, one line each: every failure, at most ``limit`` of each other status
    (a large cohort early in its run has thousands of ``not run``), then how many more there are."""
    lines, shown, more = [], collections.Counter(), collections.Counter()
    for row in rows:
        if row.status == "ok":
            continue
        if row.status != "failed" and shown[row.status] >= limit:
            more[row.status] += 1
            continue
        shown[row.status] += 1
        model = f" [{row.model}]" if row.model else ""
        lines.append(f"  {row.slide_id}{model}: {row.status} at {row.stage}: {row.reason}")
    lines += [f"  ... and {n} more {status} (see {FILE_NAME})" for status, n in sorted(more.items())]
    return lines


def summarize_quietly(cfg: Config, slides: Iterable[SlideEntry]) -> Path | None:
    """``write_summary`` for Snakemake's onsuccess / onerror handlers: reports, never raises."""
    try:
        path, rows = write_summary(cfg, slides)
    except Exception as exc:  # a summary must never turn a run into a crash
        print(f"wsi-scaat: warning: run summary not written: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    print(describe(path, rows), file=sys.stderr)
    for row in rows:
        if row.status == "failed":
            model = f" [{row.model}]" if row.model else ""
            print(f"  {row.slide_id}{model}: {row.stage} failed: {row.reason}", file=sys.stderr)
    return path
