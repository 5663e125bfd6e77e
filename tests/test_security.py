"""Security basics: no code runs from checkpoints, no value reaches a shell unquoted, no output
escapes the results folder."""

from __future__ import annotations

import ast
import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from wsi_scaat.manifest import ManifestError, read_manifest

from conftest import REPO

PACKAGE = REPO / "wsi_scaat"
WEIRD = "we;ird 'x' \"y\" $(touch PWNED1) `touch PWNED2`"


class _Payload:
    """Unpickling it would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _package_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_torch_load_is_always_weights_only() -> None:
    calls = 0
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 1


FORBIDDEN = {"eval", "exec", "os.system", "os.popen", "pickle.load", "pickle.loads", "marshal.loads"}


def test_no_shell_or_unpickling_in_the_package() -> None:
    hits = []
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            shell = [k for k in node.keywords if k.arg == "shell" and ast.unparse(k.value) != "False"]
            if ast.unparse(node.func) in FORBIDDEN or shell:
                hits.append(f"{path}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert hits == []


#: Shell placeholders that may appear unquoted: the CLI prefix and flags quoted with shlex.quote in
#: common.smk, a thread count, and wildcards constrained to names matching config.NAME_RE.
PRE_QUOTED = {"params.wsi", "params.args", "threads", "wildcards.method", "wildcards.model"}


def test_every_shell_placeholder_is_quoted() -> None:
    rules = sorted((REPO / "pipelines").glob("*.smk"))
    seen = set()
    for path in rules:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^    shell:\n((?:        .*\n?)+)", text, flags=re.M):
            for name, fmt in re.findall(r"\{([\w.]+)(:\w+)?\}", block):
                seen.add(name)
                assert fmt == ":q" or name in PRE_QUOTED, f"{path.name}: {{{name}}} is not quoted"
    assert {"log", "params.slide", "wildcards.slide"} <= seen


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    from wsi_scaat.models.registry import ModelWeightsError, load_weights
    from wsi_scaat.training.checkpoint import FORMAT, CheckpointError, load_checkpoint

    marker, evil = tmp_path / "PWNED", tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "model": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pt: cannot load checkpoint: .*weights_only"):
        load_checkpoint(evil)
    with pytest.raises(ModelWeightsError, match=r"evil.pt: cannot read weights"):
        load_weights(None, evil)  # type: ignore[arg-type]  # refused before the model is touched
    cmd = [sys.executable, "-m", "wsi_scaat", "saliency", "--checkpoint", str(evil),
           "--store", str(tmp_path / "none.h5"), "--out", str(tmp_path / "out")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 1
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("wsi-scaat: error: ") and "evil.pt" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("slide_id", ["../../x", "..", "/etc/x", "a/b", ".hidden", "a\\b", "x{y}"])
def test_unsafe_slide_id_is_a_manifest_error(tmp_path: Path, slide_id: str) -> None:
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "path", "split", "label", "annotations"])
        writer.writerows([["ok", "a.tiff", "test", "", ""], [slide_id, "b.tiff", "test", "", ""]])
    with pytest.raises(ManifestError, match=r"manifest.csv: row 3: .*slide_id"):
        read_manifest(manifest)


def _snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_path_traversal_stops_the_workflow_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,path,split,label,annotations\n../../x,x.tiff,test,,\n")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"cohort": {"name": "c", "manifest": str(manifest)},
                                      "results_dir": str(root / "results")}))  # fmt: skip
    before = _files(tmp_path)
    run = _snakemake("--cores", "1", "--configfile", str(config), cwd=root)
    assert run.returncode != 0
    assert "wsi-scaat: error: " in run.stderr and "row 2: unsafe slide_id '../../x'" in run.stderr
    new = {p for p in _files(tmp_path) - before if ".snakemake" not in p.parts}
    assert new == set() and not (root / "results").exists()


def test_braces_in_results_dir_are_a_config_error(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id,path,split,label,annotations\ns,s.tiff,test,,\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"cohort": {"name": "c", "manifest": str(manifest)},
                                      "results_dir": str(tmp_path / "res{x}")}))  # fmt: skip
    run = _snakemake("-n", "--configfile", str(config), cwd=tmp_path)
    assert run.returncode != 0 and "wsi-scaat: error: snakemake config: results_dir: braces" in run.stderr


def test_cli_refuses_unsafe_slide_ids(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import h5py

    from wsi_scaat.saliency.stage import SaliencyError, run_saliency
    from wsi_scaat.slides.tiling import TileParams, tile_slide
    from wsi_scaat.synth import make_slide

    slide = tmp_path / "s.tiff"
    make_slide(slide, 512, 512, seed=1, mpp=0.5, lesions=False)
    out = tmp_path / "deep" / "out"
    cmd = [sys.executable, "-m", "wsi_scaat", "tile", str(slide), "--out", str(out), "--slide-id", "../../x",
           "--no-progress"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 1 and "unsafe slide_id '../../x'" in run.stderr
    assert not (tmp_path / "x.h5").exists() and not out.exists()

    # A store whose recorded slide_id was tampered with cannot direct the saliency output.
    store = tile_slide(slide, out, TileParams(patch_size=32, target_mpp=2.0, min_tissue=0.0), progress=False)
    with h5py.File(store, "a") as h5:
        h5.attrs["slide_id"] = "../../x"
    with pytest.raises(SaliencyError, match=r"s.h5: unsafe slide_id '../../x'"):
        run_saliency(tiny_checkpoint, store, out / "sal", device="cpu", progress=False)
    assert not list(tmp_path.rglob("x.saliency.zarr"))


def test_weird_paths_run_through_the_workflow(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A slide path, annotations, slide_id, results folder and working folder with ';', spaces,
    quotes, '$(...)' and backticks: the workflow completes, nothing runs, all outputs stay in
    results_dir."""
    from wsi_scaat.synth import make_cohort

    root = tmp_path / WEIRD
    make_cohort(tmp_path / "synth", 1, 1024, 1024, seed=7)
    synth = tmp_path / "synth"
    data = root / f"data {WEIRD}"
    data.mkdir(parents=True)
    slide = Path(shutil.copy(synth / "slides/synth_000.tiff", data / "a; touch PWNED3; {b}.tiff"))
    ann = Path(shutil.copy(synth / "annotations/synth_000.geojson", data / "$(touch PWNED4).geojson"))
    slide_id = "s;1 'q' \"d\" $(touch PWNED5) é"
    manifest = data / "manifest;'\".csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["slide_id", "path", "split", "label", "annotations", "mpp"],
                                  [slide_id, slide.name, "test", "1", ann.name, "0.5"]])  # fmt: skip
    results = root / f"results {WEIRD}"
    cfg = {
        "cohort": {"name": "sec", "manifest": str(manifest)},
        "results_dir": str(results),
        "tiling": {"patch_size": 32, "target_mpp": 2.0, "min_tissue": 0.3},
        "model_checkpoint": str(tiny_checkpoint),
        "export": {"thumbnail_size": 256},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    before = _files(tmp_path)

    run = _snakemake("--cores", "2", "--configfile", str(config), cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    out = results / "sec"
    for kind in ("tiles.geojson", "regions.geojson", "overlay.png", "heatmap.ome.tif", "figure.png"):
        assert (out / "export/pretrained" / f"{slide_id}.{kind}").is_file(), kind
    assert "(1 ok)" in run.stderr
    assert not [p for p in tmp_path.rglob("PWNED*")] and not list(Path.cwd().glob("PWNED*"))
    escaped = [p for p in _files(tmp_path) - before
               if results not in p.parents and ".snakemake" not in p.parts]  # fmt: skip
    assert escaped == []
