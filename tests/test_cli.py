"""The command line: help on every subcommand; bad slides give one line, exit 1, no output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_scaat.cli import app

runner = CliRunner()


def _subcommands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def test_every_subcommand_has_help() -> None:
    assert runner.invoke(app, ["--help"]).exit_code == 0
    names = _subcommands()
    assert {"synth", "tile", "check-config", "info", "outputs"} <= set(names)
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage" in result.output


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsi_scaat", *args], capture_output=True, text=True)


@pytest.mark.parametrize("name", ["broken.svs", "openslide-unopenable.tiff", "openslide-unreadable.svs",
                                  "zero.svs", "truncated.svs"])  # fmt: skip
def test_bad_slide_one_line_error(slides_dir: Path, tmp_path: Path, name: str) -> None:
    if name == "zero.svs":
        slide = tmp_path / name
        slide.touch()
    elif name == "truncated.svs":
        slide = tmp_path / name
        slide.write_bytes((slides_dir / "cmu-1-small-region.svs").read_bytes()[:300_000])
    else:
        slide = slides_dir / name
    out = tmp_path / "out"
    result = _cli("tile", str(slide), "--out", str(out), "--no-progress")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsi-scaat: error: ") and name in lines[0]
    assert not out.exists() or list(out.iterdir()) == []


def test_tile_and_info(cmu_slide: Path, tmp_path: Path) -> None:
    result = _cli("tile", str(cmu_slide), "--out", str(tmp_path), "--format", "zarr", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "patches of 256 px" in result.stdout
    info = _cli("info", str(tmp_path / "cmu-1-small-region.zarr"))
    assert '"patch_size": 256' in info.stdout


def test_check_config_reports_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort: {name: c, manifest: m.csv}\ntiling: {patch_size: -3}\n")
    result = _cli("check-config", str(bad))
    assert result.returncode == 1 and "tiling.patch_size" in result.stderr
