"""The benchmark harness runs and returns well-formed rows (a smoke test: no time is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``benchmarks/`` importable, with the slide cache (also of subprocesses) in a temporary folder."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("WSI_SCAAT_BENCH_CACHE", str(tmp_path))
    import bench_tiling

    monkeypatch.setattr(bench_tiling, "CACHE", tmp_path)


def test_saliency_benchmark_rows(bench_modules: None) -> None:
    import bench_saliency
    import run_all

    rows = bench_saliency.run(quick=True, size=1536, width=8, device="cpu")
    assert rows
    for row in rows:
        assert {"benchmark", "measured", "figure", "unit", "reference", "ratio", "goal", "goal_met"} <= set(
            row
        )
        assert row["benchmark"] == "saliency" and row["unit"] == "patches/s"
        assert row["figure"] > 0 and row["ratio"] > 0 and isinstance(row["goal_met"], bool)
        shown = run_all.present(row)
        assert list(shown) == run_all.COLUMNS and shown["ratio"].endswith("x")


def test_cpu_precision_benchmark_rows_and_section(bench_modules: None, tmp_path: Path) -> None:
    import bench_cpu_precision
    import run_all

    from common import read_sections, write_section

    rows = bench_cpu_precision.run(quick=True, seeds=2)
    kinds = {r["unit"] for r in rows}
    assert {"ms/step", "x erm", "patches/s", "rho"} <= kinds
    for row in rows:
        assert row["figure"] == row["figure"] and list(run_all.present(row)) == run_all.COLUMNS  # not NaN
    steps = [r for r in rows if r["unit"] == "ms/step"]  # erm, scaat: 1-thread CPU, n-thread wall; pinned
    assert len(steps) == 5 and all(r["figure"] > 0 for r in steps)
    assert sum(isinstance(r.get("goal_met"), bool) for r in steps) == 2  # the goal is on CPU time
    quality = [r for r in rows if r.get("goal") == "in fp32 range"]
    assert len(quality) == 2 * len(bench_cpu_precision.METRICS)  # erm and scaat, every metric
    report = bench_cpu_precision.last_report
    assert report.startswith("## CPU precision") and "| within fp32 range |" in report
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nthe table\n")
    write_section(doc, "cpu_precision", report)
    write_section(doc, "cpu_precision", "## CPU precision\n\nrewritten")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nthe table\n") and text.count("## CPU precision") == 1
    assert read_sections(text)["cpu_precision"].endswith("rewritten\n<!-- bench:cpu_precision:end -->")
    kept = run_all.document("header", "body", ["training"], False, {"training": 1.0}, old=text)
    assert read_sections(kept) == read_sections(text)  # a full run keeps sections it did not rewrite


def test_run_all_rejects_unknown_names(bench_modules: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import run_all

    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "tiling,nope"])
    with pytest.raises(SystemExit):
        run_all.main()


def test_workflow_scale_benchmark_rows(bench_modules: None) -> None:
    import bench_workflow_scale

    rows = bench_workflow_scale.run(sizes=[4, 8], summary_slides=20, models=["erm"])
    assert [r["measured"] for r in rows] == [
        "snakemake -n, 4 slides, 1 models",
        "snakemake -n, 8 slides, 1 models",
        "snakemake -n growth exponent, 4 -> 8 slides",
        "wsi-scaat summarize, 20 slides (97% not run), 1 models",
    ]
    for row in rows[:2] + rows[3:]:
        assert row["benchmark"] == "workflow scale" and row["unit"] == "s" and row["figure"] > 0
        assert row["reference"].startswith("CPU ") and "peak RSS" in row["reference"]
    assert isinstance(rows[2]["figure"], float) and isinstance(rows[2]["goal_met"], bool)


def test_run_all_keeps_the_sections_written_by_hand(
    bench_modules: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import run_all

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# old table\n\n{run_all.KEPT}\n\n## By hand\n\nbefore / after\n")
    monkeypatch.setattr(run_all, "BENCHMARKS", {"none": ("bench_missing_module", "nothing")})
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--out", str(doc)])
    run_all.main()
    text = doc.read_text()
    assert "# old table" not in text and text.startswith("# Benchmarks")
    assert text.endswith(f"{run_all.KEPT}\n\n## By hand\n\nbefore / after\n")


def test_training_floor_sums_the_passes_of_a_scaat_step(bench_modules: None) -> None:
    import bench_training

    passes = {"forward + backward (train)": 0.010, "forward + input backward (batch stats)": 0.008,
              "forward + input backward (running stats)": 0.007, "optimiser step": 0.002}  # fmt: skip
    rows = bench_training.floor_rows(passes, steps=1, measured=4.0)
    erm, floor, measured = rows[-3:]
    assert erm["ms"] == pytest.approx(12.0) and erm["x erm"] == 1.0
    assert floor["ms"] == pytest.approx(7 + 8 + 2 * 10 + 2) and floor["x erm"] == pytest.approx(37 / 12)
    assert measured["x erm"] == 4.0
    timed = bench_training.pass_floor(size=16, batch=4, repeats=1, warmup=0)
    assert set(timed) == set(passes) and all(t > 0 for t in timed.values())
