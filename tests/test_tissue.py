"""Tissue detection: synthetic thumbnails with known answers, and the real slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from wsi_scaat.slides import open_slide
from wsi_scaat.slides.tissue import (
    TissueMask,
    detect_slide_tissue,
    detect_tissue,
    mask_polygons,
    read_tissue_png,
    save_tissue_png,
    tissue_geojson,
)


def _disk_image(size: int = 200, radius: int = 50) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 242, np.uint8) + rng.integers(0, 6, (size, size, 3), dtype=np.uint8)
    img[disk] = (225, 150, 185)
    return img, disk


def test_disk_is_found() -> None:
    img, disk = _disk_image()
    tissue = detect_tissue(img, downsample=16, mpp=0.5)
    iou = (tissue.mask & disk).sum() / (tissue.mask | disk).sum()
    assert iou > 0.95


def test_blank_slide_has_no_tissue() -> None:
    rng = np.random.default_rng(1)
    img = (240 + rng.integers(0, 8, (100, 100, 3))).astype(np.uint8)
    assert not detect_tissue(img, downsample=16, mpp=0.5).mask.any()


def test_fraction_in_exact() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True
    tissue = TissueMask(mask, downsample=10.0)
    got = tissue.fraction_in(np.array([0, 10, 20]), np.array([0, 0, 20]), 20)
    np.testing.assert_allclose(got, [1.0, 0.5, 0.0])


def test_polygons_in_level0_coordinates(tmp_path: Path) -> None:
    img, disk = _disk_image()
    tissue = detect_tissue(img, downsample=16, mpp=0.5)
    polys = mask_polygons(tissue)
    assert len(polys) == 1 and polys[0].is_valid
    assert polys[0].area == pytest.approx(disk.sum() * 16**2, rel=0.06)
    assert polys[0].centroid.x == pytest.approx(100 * 16, rel=0.02)
    doc = json.loads(tissue_geojson(tissue, "s1"))
    feat = doc["features"][0]
    assert feat["properties"]["objectType"] == "annotation"
    assert feat["properties"]["classification"]["name"] == "tissue"
    assert shapely.is_valid(shape(feat["geometry"]))
    save_tissue_png(tissue, tmp_path / "m.png", "s1")
    back = read_tissue_png(tmp_path / "m.png")
    assert back.downsample == 16 and (back.mask == tissue.mask).all()


def test_real_slide_mask_covers_tissue_not_background(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as reader:
        tissue, thumb = detect_slide_tissue(reader, thumbnail_mpp=8.0)
    white = thumb.min(axis=2) > 215  # glass
    stained = (thumb.max(axis=2).astype(int) - thumb.min(axis=2)) > 40  # clearly stained
    assert 0.2 < tissue.mask.mean() < 0.6
    assert (tissue.mask & stained).sum() / stained.sum() > 0.95  # the tissue is covered
    assert (tissue.mask & white).sum() / tissue.mask.sum() < 0.1  # background is not
    assert (white & ~tissue.mask).sum() / white.sum() > 0.9
