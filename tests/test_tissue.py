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


def _fragment_slide(path: Path, side_um: float = 60.0, mpp: float = 0.5) -> Path:
    """A 2048^2 glass slide holding one H&E-coloured square fragment of ``side_um`` microns."""
    from conftest import write_plain_tiff

    rng = np.random.default_rng(0)
    img = (238 + rng.integers(0, 8, (2048, 2048, 3))).astype(np.uint8)
    side = int(round(side_um / mpp))
    y0, x0 = 900, 1100
    frag = np.array([200, 110, 170], np.uint8) + rng.integers(0, 25, (side, side, 3), dtype=np.uint8)
    img[y0 : y0 + side, x0 : x0 + side] = frag
    return write_plain_tiff(path, img, mpp)


def test_small_fragment_is_tiled_with_the_defaults(tmp_path: Path) -> None:
    """One 60 x 60 um fragment (3,600 um^2, a small biopsy): found and tiled with default settings."""
    from wsi_scaat.slides.tiling import TileParams, tile_slide
    from wsi_scaat.store import open_store

    slide = _fragment_slide(tmp_path / "biopsy.tiff")
    store = tile_slide(slide, tmp_path / "out", TileParams(patch_size=32, target_mpp=1.0), progress=False)
    with open_store(store) as s:
        x, y = s.coords[:, 0], s.coords[:, 1]
        # the 64-px grid cells that overlap the 120-px fragment by more than half: 2 x 2 of them
        assert len(s) == 4
        cx, cy = x + 32, y + 32  # patch centres lie on the fragment
        assert ((cx > 1100) & (cx < 1220) & (cy > 900) & (cy < 1020)).all()
        assert json.loads(s.attrs["tissue_settings"])["min_area_um2"] == 1000.0


def test_no_tissue_error_names_the_settings(tmp_path: Path) -> None:
    """With the old 20,000 um^2 floor the fragment is dropped: the error says why, and what to do."""
    from wsi_scaat.errors import WsiScaatError
    from wsi_scaat.sections import TissueConfig
    from wsi_scaat.slides.tiling import TileParams, tile_slide

    slide = _fragment_slide(tmp_path / "biopsy.tiff")
    params = TileParams(patch_size=32, target_mpp=1.0, tissue=TissueConfig(min_area_um2=20000))
    with pytest.raises(WsiScaatError) as err:
        tile_slide(slide, tmp_path / "out", params, progress=False)
    text = str(err.value)
    assert "biopsy.tiff" in text and "no tissue detected (tissue.min_area_um2=20000" in text
    assert "--tissue-min-area-um2" in text and "min_saturation" in text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
