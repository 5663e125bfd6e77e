"""Cohorts from images with label masks: pairing, the seeded stratified split, the manifest;
``configs/wsss4luad.yaml`` on the real folder (skipped when absent)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_scaat.annotations import read_annotations
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.manifest import read_manifest
from wsi_scaat.mask_cohort import build_mask_cohort, split_by_image

from conftest import REPO

WSSS4LUAD = REPO.parent / "shared" / "data" / "wsss4luad"
CLASSES = {0: "tumour", 1: "stroma", 2: "normal"}


def test_split_is_stratified_seeded_and_exact() -> None:
    labels = {f"{i:02d}": int(i % 10 != 0) for i in range(67)}  # 7 negatives, 60 positives
    split = split_by_image(labels, test=24, val=8, seed=0)
    counts = Counter(split.values())
    assert counts == {"train": 35, "test": 24, "val": 8}
    per_label = Counter((s, labels[i]) for i, s in split.items())
    assert per_label[("test", 0)] == 3 and per_label[("val", 0)] == 1  # 24 * 7 / 67 = 2.5, 8 * 7 / 67 = 0.8
    assert split_by_image(labels, 24, 8, seed=0) == split
    assert split_by_image(labels, 24, 8, seed=1) != split
    with pytest.raises(ValueError, match="more than the 67 images"):
        split_by_image(labels, 60, 8, seed=0)


def _folder(root: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "img" / f"{i:02d}.png")
        labels = np.full((40, 50), 3, np.uint8)
        labels[5:30, 5:20] = 1
        if i % 3:
            labels[10:20, 25:45] = 0
        Image.fromarray(labels).save(root / "mask" / f"{i:02d}.png")
    return root / "img", root / "mask"


def test_build_mask_cohort_writes_manifest_and_annotations(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path / "src", 9)
    out = tmp_path / "cohort"
    run = subprocess.run([sys.executable, "-m", "wsi_scaat", "manifest-from-masks", str(images), str(masks),
                          "--out", str(out), "--classes", "0=tumour,1=stroma,2=normal", "--ignore", "3",
                          "--positive", "tumour", "--mpp", "0.5", "--test", "3", "--val", "2", "--seed", "4"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    manifest = out / "manifest.csv"
    assert run.stdout.strip() == f"{manifest}: 9 images (4 train, 2 val, 3 test)"
    entries = read_manifest(manifest)
    assert [e.slide_id for e in entries] == [f"{i:02d}" for i in range(9)]
    assert [e.label for e in entries] == [int(i % 3 != 0) for i in range(9)]
    assert all(e.mpp == 0.5 and e.path == (images / f"{e.slide_id}.png").resolve() for e in entries)
    assert Counter((e.split, e.label) for e in entries)[("test", 0)] == 1  # 3 * 3 / 9
    (tumour,) = read_annotations(entries[1].annotations, "tumour")
    assert tumour.bounds == (25, 10, 45, 20) and read_annotations(entries[0].annotations, "tumour") == []
    stamps = [p.stat().st_mtime_ns for p in sorted(out.rglob("*.*"))]
    build_mask_cohort(
        images, masks, out, CLASSES, positive="tumour", mpp=0.5, ignore={3}, test=3, val=2, seed=4
    )
    assert [p.stat().st_mtime_ns for p in sorted(out.rglob("*.*"))] == stamps  # nothing rewritten


def test_unpaired_files_and_bad_settings_are_errors(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path / "src", 3)
    (masks / "01.png").unlink()
    with pytest.raises(WsiScaatError, match="mask: no file for 01 of the other folder"):
        build_mask_cohort(
            images, masks, tmp_path / "o", CLASSES, positive="tumour", mpp=1.0, ignore={3}, test=1
        )
    Image.open(images / "00.png").save(images / "00.jpg")
    with pytest.raises(WsiScaatError, match="img: two files named 00: 00.jpg, 00.png"):
        build_mask_cohort(images, masks, tmp_path / "o", CLASSES, positive="tumour", mpp=1.0)
    with pytest.raises(WsiScaatError, match="nowhere: folder not found"):
        build_mask_cohort(tmp_path / "nowhere", masks, tmp_path / "o", CLASSES, positive="tumour", mpp=1.0)
    with pytest.raises(ValueError, match="positive class 'lesion'"):
        build_mask_cohort(images, masks, tmp_path / "o", CLASSES, positive="lesion", mpp=1.0)
    assert not (tmp_path / "o").exists()


def test_wsss4luad_cohort_and_config(tmp_path: Path) -> None:
    """The real cohort as `make real` builds it: 67 images, 24 test and 8 val, tumour patches."""
    if not (WSSS4LUAD / "mask").is_dir():
        pytest.skip(f"WSSS4LUAD crops not found at {WSSS4LUAD}")
    from wsi_scaat.config import load_config

    settings = {"positive": "tumour", "mpp": 1.0, "ignore": {3}, "test": 24, "val": 8, "seed": 0}
    manifest, counts = build_mask_cohort(WSSS4LUAD / "img", WSSS4LUAD / "mask", tmp_path, CLASSES, **settings)
    assert counts == {"train": 35, "val": 8, "test": 24}
    entries = read_manifest(manifest)
    assert len(entries) == 67 and sum(e.label == 0 for e in entries) == 6  # six crops without tumour
    cfg = load_config(REPO / "configs" / "wsss4luad.yaml")
    assert cfg.tiling.annotation_class == "tumour" and cfg.train.class_names[-1] == "tumour"
    assert cfg.saliency.target == "tumour" and set(cfg.train.methods) == {"erm", "scaat", "advgrad", "sgt"}
    assert cfg.train.ignore_band is not None and cfg.cohort.manifest == Path("data/wsss4luad/manifest.csv")
