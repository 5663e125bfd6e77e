"""Kill and resume: SIGKILLed at five moments and re-run, the workflow ends with the reference outputs.

The workflow: the Snakefile's stages tile .. export (as targets) on three synthetic 1024 px slides
(train, val, test), one small CNN trained with SCAAT for two epochs. Each kill hits a stage
mid-write (chosen by progress: a stage's temporary output on disk, or for training the first
epoch's ``last.pt``). After the kill every output under a final name must be complete (equal to
the reference run's, or for the killed training job a readable checkpoint / table / image); the
recovery a user runs (``snakemake --unlock`` then ``--rerun-incomplete``) must complete, and every
output must then equal the reference run's:

- bitwise: patch stores (.h5), tissue masks and outlines, GeoJSON, PNG, every file of the zarr
  stores (chunks; ``zarr.json`` with the run's own results folder read as the reference's, since
  saliency and heatmap attributes name the checkpoint's path), OME-TIFF with its random OME UUID
  masked, checkpoint tensors (weights, optimiser, scheduler: CPU training is deterministic);
- apart from wall-clock time: ``metrics.csv`` and the checkpoints' ``history`` without ``seconds``;
- not compared: logs, benchmarks, ``config.yaml`` and ``run_summary.csv`` (they name the run's
  folder or time it).
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from wsi_scaat.training.checkpoint import load_checkpoint

from conftest import REPO

METHOD, EPOCHS = "scaat", 2
# results sub-folder -> stage (rule) writing it
STAGES = dict(tiles="tile", models="train", saliency="saliency", heatmaps="stitch", export="export")
NOT_COMPARED = {"logs", "benchmarks", "config.yaml", "run_summary.csv", ".snakemake_timestamp"}
TEMP = re.compile(r"^\..+\.(tmp|old)-\d+$")
RUN_LIMIT_S = 1800  # a hung run fails the test instead of blocking it (not a timing assertion)


# --- the workflow ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_scaat.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("resume_cohort"), 3, 1024, 1024, seed=11)


def _workdir(root: Path, manifest: Path) -> Path:
    """A Snakemake working folder with its own config and results folder, same cohort."""
    root.mkdir(parents=True)
    cfg = {
        "cohort": {"name": "tiny", "manifest": str(manifest)},
        "results_dir": str(root / "results"),
        "tiling": {"patch_size": 32, "target_mpp": 2.0, "min_tissue": 0.3},
        "train": {"methods": [METHOD], "device": "cpu", "epochs": EPOCHS, "batch_size": 16, "lr": 0.003,
                  "num_workers": 0, "model": {"name": "small_cnn", "width": 8},
                  "augment": {"color_jitter": 0.05}, "scaat": {"warmup_epochs": 1}},
        "saliency": {"device": "cpu", "batch_size": 64},
        "stitch": {"chunk": 256},
        "export": {"thumbnail_size": 256, "tile_size": 256},
    }  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _results(workdir: Path) -> Path:
    return workdir / "results" / "tiny"


def _command(workdir: Path, manifest: Path, *flags: str) -> list[str]:
    """``snakemake`` on stages tile .. export of every slide (targets first: --configfile takes a list)."""
    res = _results(workdir)
    slides = [row["slide_id"] for row in csv.DictReader(manifest.open())]
    targets = [f"{res}/tiles/{s}.h5" for s in slides] + [f"{res}/models/{METHOD}/best.pt"]
    targets += [f"{res}/export/{METHOD}/{s}.overlay.png" for s in slides]
    options = ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *flags]
    return [sys.executable, "-m", "snakemake", *targets, *options, "--configfile", f"{workdir}/config.yaml"]


def _run(workdir: Path, manifest: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = _command(workdir, manifest, *flags)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_LIMIT_S)


@pytest.fixture(scope="module")
def reference(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results of an uninterrupted run."""
    workdir = _workdir(tmp_path_factory.mktemp("resume") / "reference", manifest)
    run = _run(workdir, manifest)
    assert run.returncode == 0, run.stderr[-3000:]
    return _results(workdir)


# --- kill moments ----------------------------------------------------------------------------


def _temps(res: Path, folder: str) -> bool:
    return any(TEMP.match(p.name) for p in (res / folder).rglob(".*")) if (res / folder).is_dir() else False


def _mid_training(res: Path) -> bool:
    """Epoch 1 saved (``last.pt`` is written after ``metrics.csv``), epoch 2 not yet."""
    models = res / "models" / METHOD
    try:
        rows = (models / "metrics.csv").read_text().strip().splitlines()
    except FileNotFoundError:
        return False
    return (models / "last.pt").is_file() and len(rows) == 2


# In workflow order: a moment already past (its stage was too quick) gives way to the next one's.
MOMENTS: dict[str, Callable[[Path], bool]] = {
    "tile": lambda res: _temps(res, "tiles"),
    "train": _mid_training,
    "saliency": lambda res: _temps(res, "saliency"),
    "stitch": lambda res: _temps(res, "heatmaps"),
    "export": lambda res: _temps(res, "export"),
}


def _running(workdir: Path) -> set[str]:
    """Stages of the jobs Snakemake had started and not finished (its incomplete markers)."""
    markers = workdir / ".snakemake" / "incomplete"
    stages = set()
    for marker in markers.rglob("*") if markers.is_dir() else ():
        if marker.is_file():
            path = Path(base64.urlsafe_b64decode("".join(marker.relative_to(markers).parts)).decode())
            stages.add(STAGES[path.relative_to(_results(workdir)).parts[0]])
    return stages


def _kill_at(workdir: Path, manifest: Path, moment: str) -> dict[str, Any]:
    """Start the workflow, SIGKILL its process group at ``moment`` (or a later one); what was running."""
    names = list(MOMENTS)
    later = [MOMENTS[n] for n in names[names.index(moment) :]]
    res = _results(workdir)
    with open(workdir / "killed.log", "w") as log:
        proc = subprocess.Popen(_command(workdir, manifest), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + RUN_LIMIT_S
        while proc.poll() is None and time.monotonic() < deadline:
            hit = [n for n, cond in zip(names[names.index(moment) :], later, strict=True) if cond(res)]
            if hit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"moment": hit[0], "running": _running(workdir)}
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail(f"the workflow ended (rc {proc.returncode}) before any moment from {moment!r} on")


# --- comparisons -----------------------------------------------------------------------------


def _outputs(res: Path) -> dict[str, Path]:
    """Final outputs by path relative to ``res``: files, and zarr stores as one unit each."""
    out: dict[str, Path] = {}
    for path in sorted(res.rglob("*")):
        parts = path.relative_to(res).parts
        if NOT_COMPARED & set(parts) or any(TEMP.match(p) for p in parts):
            continue
        if path.suffix == ".zarr" or (path.is_file() and not any(p.endswith(".zarr") for p in parts[:-1])):
            out["/".join(parts)] = path
    return out


def _same_bytes(a: Path, b: Path, swap: tuple[bytes, bytes]) -> bool:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    if a.suffix in (".json", ".geojson", ".csv", ".yaml"):
        data_b = data_b.replace(*swap)
    if a.name.endswith(".ome.tif"):  # tifffile writes a random OME UUID
        uuid = re.compile(rb"urn:uuid:[0-9a-f-]{36}")
        data_a, data_b = uuid.sub(b"urn:uuid:*", data_a), uuid.sub(b"urn:uuid:*", data_b)
    return data_a == data_b


def _same_value(a: Any, b: Any, swap: tuple[str, str], where: str) -> list[str]:
    """Differences between two checkpoint values (tensors bitwise; ``seconds`` ignored)."""
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [where]
        return [d for k in a if k != "seconds" for d in _same_value(a[k], b[k], swap, f"{where}.{k}")]
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return [where]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _same_value(x, y, swap, f"{where}[{i}]")]
    if isinstance(a, str) and isinstance(b, str):
        return [] if a == b.replace(*swap) else [where]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [where]


def _metrics_rows(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(path.open())]


def _differences(ref: Path, res: Path, rel: str) -> list[str]:
    """How output ``rel`` of results ``res`` differs from the reference's (empty: equal)."""
    a, b = ref / rel, res / rel
    swap = (str(res.parents[1]), str(ref.parents[1]))
    if a.suffix == ".zarr":
        files_a = {str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name not in NOT_COMPARED}
        files_b = {str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name not in NOT_COMPARED}
        if files_a != files_b:
            return [f"{rel}: files {sorted(files_a ^ files_b)[:5]}"]
        bswap = (swap[0].encode(), swap[1].encode())
        return [f"{rel}/{f}" for f in sorted(files_a) if not _same_bytes(a / f, b / f, bswap)]
    if a.suffix == ".pt":
        state_a, state_b = load_checkpoint(a), load_checkpoint(b)
        return [f"{rel}: {d}" for d in _same_value(state_a, state_b, swap, "checkpoint")]
    if a.name == "metrics.csv":
        return [] if _metrics_rows(a) == _metrics_rows(b) else [rel]
    return [] if _same_bytes(a, b, (swap[0].encode(), swap[1].encode())) else [rel]


def _readable(path: Path) -> None:
    """A training output of a job still running: complete in itself (the job rewrites it each epoch)."""
    from PIL import Image

    if path.suffix == ".pt":
        assert load_checkpoint(path)["epoch"] >= 1
    elif path.suffix == ".csv":
        assert _metrics_rows(path)
    elif path.suffix == ".png":
        Image.open(io.BytesIO(path.read_bytes())).load()


# --- the test --------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(reference: Path, manifest: Path, tmp_path: Path) -> None:
    ref_outputs = set(_outputs(reference))
    hits = []
    for moment in MOMENTS:
        workdir = _workdir(tmp_path / moment, manifest)
        res = _results(workdir)
        killed = _kill_at(workdir, manifest, moment)
        hits.append(killed["moment"])

        # nothing incomplete under a final name: each output there is the reference's, except the
        # records the killed training job rewrites every epoch (complete files of an earlier epoch)
        for rel, path in _outputs(res).items():
            if rel.startswith(f"models/{METHOD}/") and "train" in killed["running"]:
                _readable(path)
            else:
                assert rel in ref_outputs and not _differences(reference, res, rel), (moment, killed, rel)

        # the user's recovery: remove the stale lock, re-run the incomplete jobs
        unlock = _run(workdir, manifest, "--unlock")
        assert unlock.returncode == 0, unlock.stderr[-3000:]
        again = _run(workdir, manifest, "--rerun-incomplete")
        assert again.returncode == 0, (moment, killed, again.stderr[-3000:])
        train_log = (res / "logs" / "train" / f"{METHOD}.log").read_text()
        if killed["moment"] == "train":
            assert f"resuming from {res}/models/{METHOD}/last.pt after epoch 1" in train_log, train_log

        outputs = _outputs(res)
        assert set(outputs) == ref_outputs, sorted(set(outputs) ^ ref_outputs)
        diffs = [d for rel in sorted(outputs) for d in _differences(reference, res, rel)]
        assert not diffs, (moment, killed, diffs[:10])
        assert not [p for p in res.rglob(".*") if TEMP.match(p.name)], "temporaries of killed jobs left"
        print(f"killed at {moment!r}: hit {killed['moment']!r} while running {sorted(killed['running'])}")
    assert len(set(hits)) >= 4, hits


def test_atomic_output_removes_temporaries_of_killed_writers(tmp_path: Path) -> None:
    from wsi_scaat.atomic import write_text

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = [tmp_path / f".out.h5.old-{dead.pid}", tmp_path / f".out.h5.tmp-{dead.pid}",
             tmp_path / f"..out.h5.tmp-{dead.pid}.tmp-{dead.pid}"]  # fmt: skip
    stale[0].mkdir()
    for path in stale[1:]:
        path.write_text("half")
    kept = [tmp_path / f".out.h5.tmp-{os.getppid()}", tmp_path / f".other.h5.tmp-{dead.pid}"]
    for path in kept:  # a writer still running; another output's
        path.write_text("half")
    write_text(tmp_path / "out.h5", "whole")
    assert (tmp_path / "out.h5").read_text() == "whole"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_training_resumes_after_snakemake_removed_its_outputs(tiny_cohort: dict, tmp_path: Path) -> None:
    from wsi_scaat.config import validate_config
    from wsi_scaat.training.trainer import fit

    cfg = validate_config({**tiny_cohort, "train": {**tiny_cohort["train"], "epochs": 2}})
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(cfg, "erm", full, log=lambda _: None)
    fit(cfg, "erm", cut, stop_after=1, log=lambda _: None)  # killed after epoch 1
    declared = ("best.pt", "metrics.csv", "curves.png")
    for name in declared:  # what Snakemake deletes before re-running an incomplete job
        (cut / name).unlink()
    lines: list[str] = []
    fit(cfg, "erm", cut, resume=True, log=lines.append)
    assert any(line.startswith(f"resuming from {cut / 'last.pt'} after epoch 1") for line in lines), lines
    for name in ("best.pt", "last.pt"):
        assert not _same_value(load_checkpoint(full / name), load_checkpoint(cut / name), ("", ""), name)
    assert _metrics_rows(full / "metrics.csv") == _metrics_rows(cut / "metrics.csv")
    best_epoch = load_checkpoint(cut / "last.pt")["best_epoch"]
    assert [p.name for p in cut.glob("best-epoch*.pt")] == [f"best-epoch{best_epoch}.pt"]

    # a finished run whose outputs were removed is a forced re-run: trained again, not resumed
    for name in declared:
        (full / name).unlink()
    lines.clear()
    fit(cfg, "erm", full, resume=True, log=lines.append)
    assert any("forced re-run" in line and "starting afresh" in line for line in lines), lines
    assert all((full / name).is_file() for name in declared)
