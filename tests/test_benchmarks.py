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


def test_run_all_rejects_unknown_names(bench_modules: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import run_all

    monkeypatch.setattr(sys, "argv", ["run_all.py", "--only", "tiling,nope"])
    with pytest.raises(SystemExit):
        run_all.main()
