"""Tests of the synthetic slide / cohort generator (wsi_scaat.synth)."""

from __future__ import annotations

import csv
import json
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from shapely.geometry import Polygon

from wsi_scaat.synth import (
    MANIFEST_COLUMNS,
    make_cohort,
    make_slide,
    rasterize,
    read_annotations,
    write_annotations,
)
from wsi_scaat.synth.cohort import assign_splits, slide_geometry

openslide = pytest.importorskip("openslide")

W, H, SEED = 1024, 768, 3


@pytest.fixture(scope="module")
def lesion_slide(tmp_path_factory) -> tuple[Path, list[Polygon]]:
    path = tmp_path_factory.mktemp("slide") / "lesion.tiff"
    return path, make_slide(path, W, H, SEED)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"), 6, 640, 512, seed=11)


def _read_rgb(path: Path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")).astype(int)


def test_openslide_reads_pyramid(lesion_slide):
    path, polys = lesion_slide
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.dimensions == (W, H)
        assert s.level_count > 1
        assert s.level_dimensions[1] == (W // 2, H // 2)
        assert s.properties[openslide.PROPERTY_NAME_MPP_X] == "0.5"
        assert s.properties[openslide.PROPERTY_NAME_MPP_Y] == "0.5"
        region = np.asarray(s.read_region((100, 50), 1, (64, 48)).convert("RGB"))
        assert region.shape == (48, 64, 3)
    assert polys and all(isinstance(p, Polygon) and p.is_valid for p in polys)
    assert all(0 <= v <= lim for p in polys for v, lim in zip(p.bounds, (W, H, W, H), strict=True))


def test_tiff_structure_and_non_default_mpp(tmp_path):
    path = tmp_path / "s.tiff"
    assert make_slide(path, 600, 520, seed=1, mpp=0.25, lesions=False, tile_size=128) == []
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties[openslide.PROPERTY_NAME_MPP_X] == "0.25"
        assert s.level_dimensions == ((600, 520), (300, 260))
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 2  # one IFD per level, no SubIFDs
        for page in tif.pages:
            assert page.is_tiled and page.tilewidth == page.tilelength == 128
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.samplesperpixel == 3 and page.dtype == np.uint8
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            for tag in ("DateTime", "Software", "ImageDescription", "SubIFDs"):
                assert tag not in page.tags
        assert tif.pages[1].tags["XResolution"].value == (20000, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["s.tiff"]  # temporaries cleaned up


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from wsi_scaat.synth import render

    calls = []

    def boom(self, y0, h):
        calls.append(y0)
        if len(calls) == 3:
            raise RuntimeError("paint failed")
        return np.full((h, self.width, 3), 200, np.uint8)

    monkeypatch.setattr(render.StripPainter, "__call__", boom)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="paint failed"):
        make_slide(tmp_path / "x.tiff", 600, 520, seed=1, lesions=False, tile_size=128)
    assert list(tmp_path.iterdir()) == []
    assert set(threading.enumerate()) <= before  # the painting thread was joined


def test_same_seed_same_bytes(tmp_path, lesion_slide):
    path, polys = lesion_slide
    again = make_slide(tmp_path / "again.tiff", W, H, SEED)
    assert (tmp_path / "again.tiff").read_bytes() == path.read_bytes()
    assert [p.wkb for p in again] == [p.wkb for p in polys]
    other = make_slide(tmp_path / "other.tiff", W, H, SEED + 1)
    assert (tmp_path / "other.tiff").read_bytes() != path.read_bytes()
    assert [p.wkb for p in other] != [p.wkb for p in polys]


def test_cohort_is_deterministic(tmp_path):
    a = make_cohort(tmp_path / "a", 3, 320, 256, seed=5)
    b = make_cohort(tmp_path / "b", 3, 320, 256, seed=5)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    assert len(files) == 7
    assert files == sorted(p.relative_to(b.parent) for p in b.parent.rglob("*") if p.is_file())
    for rel in files:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    c = make_cohort(tmp_path / "c", 3, 320, 256, seed=6)
    assert (c.parent / "slides/synth_000.tiff").read_bytes() != (
        a.parent / "slides/synth_000.tiff"
    ).read_bytes()


def test_lesion_texture_matches_polygons(lesion_slide):
    path, polys = lesion_slide
    tissue, lesions = slide_geometry(W, H, SEED)
    assert [p.wkb for p in lesions] == [p.wkb for p in polys]
    t_area = sum(p.area for p in tissue)
    assert 0.2 < t_area / (W * H) < 0.7
    assert 0.03 < sum(p.area for p in polys) / t_area < 0.3

    rgb = _read_rgb(path)
    tis, les = rasterize(tissue, 0, H, 0, W), rasterize(polys, 0, H, 0, W)
    assert les.any() and not (les & ~tis).any()
    inside = ndimage.binary_erosion(les, iterations=4)
    near = ndimage.binary_dilation(les, iterations=20) & ~ndimage.binary_dilation(les, iterations=4)
    normal = ndimage.binary_erosion(tis, iterations=4) & ~ndimage.binary_dilation(les, iterations=4)
    background = ~ndimage.binary_dilation(tis, iterations=4)
    dark = rgb.sum(-1) < 300  # nucleus-like pixels
    f_les, f_norm, f_near = dark[inside].mean(), dark[normal].mean(), dark[near & normal].mean()
    assert f_les > 0.3 and f_norm < 0.12 and f_les > 4 * f_norm
    assert f_near < 0.15  # the lesion texture does not leak outside its polygon
    # larger, darker nuclei: mean size of dark connected components is much larger inside
    lab_les, n_les = ndimage.label(dark & inside)
    lab_norm, n_norm = ndimage.label(dark & normal)
    assert (dark & inside).sum() / n_les > 3 * (dark & normal).sum() / n_norm
    assert (rgb[background].mean(0) > 230).all() and rgb[background].std() < 5
    assert rgb[normal].mean(0)[1] < 200  # tissue is clearly stained


def test_manifest(cohort):
    rows = list(csv.DictReader(cohort.open()))
    assert tuple(csv.reader(cohort.open()).__next__()) == MANIFEST_COLUMNS
    assert [r["slide_id"] for r in rows] == [f"synth_{i:03d}" for i in range(6)]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for split in ("train", "val", "test"):  # 6 slides, half with lesions: both labels per split
        assert {r["label"] for r in rows if r["split"] == split} == {"0", "1"}
    for r in rows:
        assert r["path"] == f"slides/{r['slide_id']}.tiff" and r["mpp"] == "0.5"
        assert r["annotations"] == f"annotations/{r['slide_id']}.geojson"
        assert (cohort.parent / r["path"]).is_file()
        polys = read_annotations(cohort.parent / r["annotations"])
        assert (len(polys) > 0) == (r["label"] == "1")


def test_geojson_structure(cohort):
    n_lesion = 0
    for path in sorted((cohort.parent / "annotations").glob("*.geojson")):
        data = json.loads(path.read_text())
        assert data["type"] == "FeatureCollection"
        n_lesion += bool(data["features"])
        for feat in data["features"]:
            assert feat["type"] == "Feature"
            assert feat["properties"] == {
                "objectType": "annotation",
                "classification": {"name": "lesion", "color": [255, 0, 0]},
            }
            assert feat["geometry"]["type"] == "Polygon"
            ring = feat["geometry"]["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) >= 4
            poly = Polygon(ring, feat["geometry"]["coordinates"][1:])
            assert poly.is_valid and poly.area > 0
            assert all(0 <= x <= 640 and 0 <= y <= 512 for x, y in ring)
    assert n_lesion == 3


@pytest.mark.parametrize("n", range(1, 13))
def test_assign_splits(n):
    labels, splits = assign_splits(n, round(n / 2), (0.6, 0.2, 0.2), np.random.default_rng(n))
    assert len(labels) == len(splits) == n and sum(labels) == round(n / 2)
    if n >= 3:
        assert set(splits) == {"train", "val", "test"}
    if n >= 6:
        for s in ("train", "val", "test"):
            assert {lab for lab, sp in zip(labels, splits, strict=True) if sp == s} == {0, 1}
    if n >= 10:
        assert splits.count("train") > max(splits.count("val"), splits.count("test"))


def test_annotations_round_trip(tmp_path):
    polys = [
        Polygon([(0, 0), (10.5, 0), (10.5, 8.25), (0, 8.25)], [[(2, 2), (4, 2), (4, 4), (2, 4)]]),
        Polygon([(20, 20), (30, 21), (25, 29.99)]),
    ]
    path = tmp_path / "a.geojson"
    write_annotations(path, polys)
    text = path.read_text()
    back = read_annotations(path)
    assert [p.equals(q) for p, q in zip(polys, back, strict=True)] == [True, True]
    write_annotations(path, polys)
    assert path.read_text() == text
    assert read_annotations(path, name="tumour") == []
    assert len(read_annotations(path, name=None)) == 2
    write_annotations(tmp_path / "empty.geojson", [])
    assert json.loads((tmp_path / "empty.geojson").read_text()) == {
        "type": "FeatureCollection",
        "features": [],
    }
    assert read_annotations(tmp_path / "empty.geojson") == []


def test_read_annotations_repairs_bowtie(tmp_path):
    path = tmp_path / "bowtie.geojson"
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "lesion"}},
    }
    multi = {
        "type": "Feature",
        "geometry": {
            "type": "MultiPolygon",
            "coordinates": [[[[20, 0], [30, 0], [30, 5], [20, 5], [20, 0]]]],
        },
        "properties": {"classification": {"name": "lesion"}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature, multi]}))
    with pytest.warns(UserWarning, match="bowtie.geojson"):
        polys = read_annotations(path)
    assert all(p.is_valid for p in polys)
    assert len(polys) == 3  # two triangles + the MultiPolygon's square
    assert math.isclose(sum(p.area for p in polys), 50 + 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [multi]}))
        assert len(read_annotations(path)) == 1


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    y0=st.integers(-20, 60),
    x0=st.integers(-20, 60),
)
def test_rasterize_matches_pixel_centres(seed, y0, x0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 2 * np.pi, 12))
    r = rng.uniform(5, 40, 12)
    outer = Polygon(np.c_[50 + r * np.cos(t), 50 + r * np.sin(t)])
    hole = shapely.Point(50, 50).buffer(3)
    poly = shapely.make_valid(outer.difference(hole) if outer.contains(hole) else outer)
    polys = [poly] if isinstance(poly, Polygon) else [g for g in poly.geoms if isinstance(g, Polygon)]
    mask = rasterize(polys, y0, 64, x0, 80)
    yy, xx = np.mgrid[y0 : y0 + 64, x0 : x0 + 80] + 0.5
    expected = shapely.contains_xy(shapely.union_all(polys), xx, yy)
    # pixel centres exactly on an edge may go either way
    on_edge = shapely.distance(shapely.union_all(polys).boundary, shapely.points(xx, yy)) < 1e-9
    assert np.array_equal(mask[~on_edge], expected[~on_edge])
