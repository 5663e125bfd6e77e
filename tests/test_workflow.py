"""The Snakemake workflow end to end on a tiny cohort: keep-going, logs, up-to-date reruns."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsi_scaat.store import open_store

from conftest import REPO

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_scaat.synth import make_cohort

    root = tmp_path_factory.mktemp("wf")
    manifest = make_cohort(root / "data", 3, 1024, 1024, seed=5)
    return manifest


def _config(root: Path, manifest: Path, **tiling: object) -> Path:
    cfg = {
        "cohort": {"name": "tiny", "manifest": str(manifest)},
        "results_dir": str(root / "results"),
        "tiling": {"patch_size": 64, "target_mpp": 1.0, **tiling},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_keep_going_with_a_broken_slide(cohort: Path, slides_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    rows = cohort.read_text().replace("slides/", f"{cohort.parent}/slides/")
    rows = rows.replace("annotations/", f"{cohort.parent}/annotations/")
    shutil.copy(slides_dir / "broken.svs", tmp_path / "broken.svs")
    manifest.write_text(rows + "broken,broken.svs,test,0,,\n")
    config = _config(tmp_path, manifest)

    run = _run("--cores", "2", "--keep-going", "--configfile", str(config), cwd=tmp_path)
    assert run.returncode != 0  # one slide failed
    tiles, logs = tmp_path / "results/tiny/tiles", tmp_path / "results/tiny/logs/tile"
    for sid in ("synth_000", "synth_001", "synth_002"):
        with open_store(tiles / f"{sid}.h5") as store:
            assert len(store) > 0 and "labels" in store
        assert (tiles / f"{sid}.tissue.png").is_file() and (logs / f"{sid}.log").is_file()
    assert not (tiles / "broken.h5").exists()
    assert sorted(p.name for p in tiles.iterdir() if p.name.startswith("broken")) == []
    (line,) = (logs / "broken.log").read_text().strip().splitlines()
    assert line.startswith("wsi-scaat: error:") and "broken.svs" in line

    targets = [str(tiles / f"synth_00{i}.h5") for i in range(3)]
    again = _run(*targets, "--cores", "2", "--configfile", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_bad_config_stops_before_any_work(cohort: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, cohort, patch_sise=64)
    run = _run("--cores", "1", "--configfile", str(config), cwd=tmp_path)
    assert run.returncode != 0
    assert "tiling.patch_sise: unknown key" in run.stderr + run.stdout
    assert not (tmp_path / "results").exists()


def test_zarr_format_from_config(cohort: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, cohort, format="zarr")
    target = str(tmp_path / "results/tiny/tiles/synth_000.zarr")
    run = _run(target, "--cores", "2", "--configfile", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with open_store(target) as store:
        assert store.format == "zarr" and store.patch_size == 64


def test_new_cohort_with_trained_model_trains_nothing(
    cohort: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    cfg = {
        "cohort": {"name": "new", "manifest": str(cohort)},
        "results_dir": str(tmp_path / "results"),
        "tiling": {"patch_size": 32, "target_mpp": 2.0, "min_tissue": 0.3},
        "model_checkpoint": str(tiny_checkpoint),
        "export": {"thumbnail_size": 256},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    plan = _run("-n", "--quiet", "rules", "--configfile", str(config), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    text = plan.stdout + plan.stderr
    assert "train" not in text.split()
    for rule in ("tile", "saliency", "stitch", "export"):
        assert rule in text.split(), rule
    run = _run("--cores", "2", "--configfile", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    export = tmp_path / "results/new/export/pretrained"
    for sid in ("synth_000", "synth_001", "synth_002"):
        for kind in ("tiles.geojson", "regions.geojson", "overlay.png", "heatmap.ome.tif", "figure.png"):
            assert (export / f"{sid}.{kind}").is_file(), (sid, kind)
    assert not (tmp_path / "results/new/models").exists()
