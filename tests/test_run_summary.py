"""The run summary: status, failing stage and one-line reason of each slide, from outputs and logs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from wsi_scaat.config import Config, validate_config
from wsi_scaat.manifest import SlideEntry
from wsi_scaat.run_summary import collect, log_error, summarize_quietly, write_summary

TRACEBACK = """Traceback (most recent call last):
  File "x.py", line 1, in <module>
MemoryError: cannot allocate
"""
WARNING = (
    "/x/wsi_scaat/slides/tiling.py:190: UserWarning: /d/a.geojson: feature 0 is invalid "
    "(Self-intersection[512 512]); repaired with make_valid\n  polygons = read_annotations(...)\n"
)


def _config(tmp_path: Path) -> Config:
    cohort = {"name": "c", "manifest": str(tmp_path / "m.csv")}
    return validate_config(
        {"cohort": cohort, "results_dir": str(tmp_path / "results"), "train": {"methods": ["erm"]}}
    )


def _entry(sid: str) -> SlideEntry:
    return SlideEntry(sid, Path(f"/slides/{sid}.svs"), "test", None, None, None)


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _tiled(root: Path, sid: str, log: str = "") -> None:
    for suffix in (".h5", ".tissue.png", ".tissue.geojson"):
        _touch(root / "tiles" / f"{sid}{suffix}")
    _touch(root / "logs/tile" / f"{sid}.log", log)


def test_statuses_and_reasons(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    root = cfg.results
    _touch(root / "logs/tile/bad.log", "wsi-scaat: error: /slides/bad.svs: cannot open as a slide\n")
    _tiled(root, "crash")
    _touch(root / "logs/saliency/erm/crash.log", TRACEBACK)
    _tiled(root, "killed")
    _touch(root / "logs/saliency/erm/killed.log", "")
    _tiled(root, "good", WARNING)
    _touch(root / "models/erm/best.pt")
    _touch(root / "saliency/erm/good.saliency.zarr/zarr.json")
    _touch(root / "heatmaps/erm/good.heatmap.zarr/zarr.json")
    for suffix in (".heatmap.ome.tif", ".heatmap_rgb.ome.tif", ".thumbnail.png", ".heatmap.png",
                   ".overlay.png", ".figure.png", ".tiles.geojson", ".regions.geojson"):  # fmt: skip
        _touch(root / "export/erm" / f"good{suffix}")
    slides = [_entry(s) for s in ("bad", "crash", "killed", "good", "later")]

    rows = {r.slide_id: r for r in collect(cfg, slides)}
    assert (rows["bad"].status, rows["bad"].stage, rows["bad"].model) == ("failed", "tile", "")
    assert rows["bad"].reason == "/slides/bad.svs: cannot open as a slide"
    assert (rows["crash"].status, rows["crash"].stage, rows["crash"].model) == ("failed", "saliency", "erm")
    assert rows["crash"].reason == "MemoryError: cannot allocate"
    assert (rows["killed"].status, rows["killed"].stage) == ("incomplete", "saliency")
    assert (rows["good"].status, rows["good"].stage, rows["good"].reason) == ("ok", "", "")
    assert rows["good"].warnings.startswith("tile: UserWarning: /d/a.geojson: feature 0 is invalid")
    assert (rows["later"].status, rows["later"].stage) == ("not run", "tile")

    path, _ = write_summary(cfg, slides)
    assert path == root / "run_summary.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in table] == ["bad", "crash", "killed", "good", "later"]
    assert list(table[0]) == ["slide_id", "path", "model", "status", "stage", "reason", "warnings"]


def test_failed_training_is_the_reason_downstream(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    _tiled(cfg.results, "s")
    _touch(cfg.results / "logs/train/erm.log", "wsi-scaat: error: no labelled patches in the train split\n")
    (row,) = collect(cfg, [_entry("s")])
    assert (row.status, row.stage, row.model) == ("not run", "saliency", "erm")
    assert row.reason == "model 'erm' failed to train: no labelled patches in the train split"


def test_log_error_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("progress\nwsi-scaat: error: f.svs: first\nwsi-scaat: error: f.svs:  last\n\tcause\n")
    assert log_error(log) == "f.svs: last"
    log.write_text("all fine\n")
    assert log_error(log) is None and log_error(tmp_path / "none.log") is None


def test_summary_never_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    _touch(cfg.results)  # a file where the results folder should be: the summary cannot be written
    assert summarize_quietly(cfg, [_entry("s")]) is None
    assert "run summary not written" in capsys.readouterr().err


def test_each_log_is_read_once_and_each_folder_listed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import collections
    import os

    from wsi_scaat import run_summary

    cohort = {"name": "c", "manifest": str(tmp_path / "m.csv")}
    cfg = validate_config({"cohort": cohort, "results_dir": str(tmp_path / "results"),
                           "train": {"methods": ["erm", "scaat"]}})  # fmt: skip
    root = cfg.results
    slides = [_entry(f"s{i:02d}") for i in range(30)]
    for entry in slides[:10]:
        _tiled(root, entry.slide_id, WARNING)
    for entry in slides[10:15]:
        _touch(root / "logs/tile" / f"{entry.slide_id}.log", "wsi-scaat: error: x.svs: cannot open\n")
    for model in ("erm", "scaat"):
        _touch(root / "logs/train" / f"{model}.log", "wsi-scaat: error: no labelled patches\n")

    reads: collections.Counter[Path] = collections.Counter()
    listed: collections.Counter[str] = collections.Counter()
    read_log, listdir = run_summary._read_log, os.listdir
    monkeypatch.setattr(run_summary, "_read_log", lambda path: reads.update([path]) or read_log(path))
    monkeypatch.setattr(os, "listdir", lambda path: listed.update([str(path)]) or listdir(path))
    rows = collect(cfg, slides)

    logs = {p for p in root.rglob("*.log")}
    assert set(reads) == logs and set(reads.values()) == {1}  # 15 tile logs, 2 training logs
    assert set(listed.values()) == {1}
    statuses = collections.Counter((r.status, r.stage, r.model) for r in rows)
    assert statuses == {("not run", "saliency", "erm"): 10, ("not run", "saliency", "scaat"): 10,
                        ("failed", "tile", ""): 5, ("not run", "tile", ""): 15}  # fmt: skip
    assert rows[0].reason == "model 'erm' failed to train: no labelled patches"
    assert rows[0].warnings.startswith("tile: UserWarning:")


def test_problem_lines_show_every_failure_and_count_the_rest() -> None:
    from wsi_scaat.run_summary import SummaryRow, problem_lines

    def row(sid: str, status: str) -> SummaryRow:
        return SummaryRow(sid, f"/s/{sid}.svs", "", status, "tile", "why", "")

    rows = [row(f"f{i}", "failed") for i in range(30)] + [row(f"n{i}", "not run") for i in range(25)]
    rows += [row("ok", "ok"), row("k", "incomplete")]
    lines = problem_lines(rows, limit=20)
    assert lines[0] == "  f0: failed at tile: why" and sum("failed at" in x for x in lines) == 30
    assert sum("not run at" in x for x in lines) == 20 and sum("incomplete at" in x for x in lines) == 1
    assert lines[-1] == "  ... and 5 more not run (see run_summary.csv)" and not any("ok" in x for x in lines)
