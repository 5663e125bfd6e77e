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
    assert {
        "synth",
        "tile",
        "check-config",
        "info",
        "outputs",
        "masks-to-geojson",
        "manifest-from-masks",
    } <= set(names)
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


# Each subcommand's options and the config sections they take their defaults from; an option maps to
# the field of the same name, after the listed renames.
CLI_SECTIONS = {
    "synth": ("SynthConfig", {"lesion_fraction": "lesion_slide_fraction"}),
    "tile": ("TilingConfig", {}),
    "saliency": ("SaliencyConfig", {}),
    "stitch": ("StitchConfig", {}),
    "export": ("ExportConfig", {}),
}


def _option_defaults(name: str) -> dict[str, object]:
    import typer.main

    command = typer.main.get_command(app).commands[name]
    out = {}
    for param in command.params:
        default = param.default
        out[param.name] = default.value if hasattr(default, "value") else default
    return out


def _config_field(command: str, option: str) -> tuple[type, str] | None:
    """The config section and field an option of ``command`` takes its default from, if any."""
    from wsi_scaat import sections

    section_name, renames = CLI_SECTIONS[command]
    if command == "tile" and (option == "thumbnail_mpp" or option.startswith("tissue_")):
        return sections.TissueConfig, option.removeprefix("tissue_")
    section, field = getattr(sections, section_name), renames.get(option, option)
    if field not in section.model_fields or section.model_fields[field].is_required():
        return None
    return section, field


@pytest.mark.parametrize("name", sorted(CLI_SECTIONS))
def test_cli_defaults_are_the_config_defaults(name: str) -> None:
    """One source of truth: every CLI option named after a config field has that field's default."""
    compared = []
    for option, default in _option_defaults(name).items():
        found = _config_field(name, option)
        if found is None:
            continue
        section, field = found
        expected = section.model_fields[field].get_default(call_default_factory=True)
        assert default == expected, f"{name} --{option.replace('_', '-')}: {default!r} != {expected!r}"
        compared.append(option)
    assert len(compared) == {"synth": 8, "tile": 14, "saliency": 7, "stitch": 7, "export": 10}[name], compared


def test_shipped_review_settings_are_the_defaults() -> None:
    """configs/default.yaml (quoted by docs/qupath.md) exports and detects tissue with the model defaults."""
    import yaml

    from wsi_scaat.sections import ExportConfig, TissueConfig

    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs" / "default.yaml").read_text())
    for key, section in (("export", ExportConfig), ("tissue", TissueConfig)):
        assert shipped[key] == section().model_dump(mode="json"), key
