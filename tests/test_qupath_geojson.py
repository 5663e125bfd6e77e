"""Every GeoJSON the product writes, read by QuPath's own parser (the ``qupath_read`` fixture).

The review exports (``tiles.geojson``, ``regions.geojson``) are checked in ``test_export.py``;
here the tissue outline of the tiler and the lesion annotations of ``wsi-scaat synth``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import shapely
from shapely.geometry import Polygon, box, shape

from wsi_scaat.slides.tiling import TileParams, tile_slide
from wsi_scaat.synth import make_cohort, write_annotations


def _geometry(path: Path) -> shapely.Geometry:
    """The union of a GeoJSON file's geometries, as written."""
    return shapely.union_all([shape(f["geometry"]) for f in json.loads(path.read_text())["features"]])


def _bounds(read: dict) -> tuple[float, float, float, float]:
    b = read["first_bounds"]
    return b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]


def test_reader_reports_what_qupath_refuses(tmp_path: Path, qupath_read) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": 3}]}')
    (read,) = qupath_read(bad)
    assert set(read) == {"file", "error"}


def test_tissue_outline(synth_slide: tuple[Path, Path], tmp_path: Path, qupath_read) -> None:
    slide, _ = synth_slide
    tile_slide(slide, tmp_path, TileParams(patch_size=64, target_mpp=2.0), slide_id="s1", progress=False)
    path = tmp_path / "s1.tissue.geojson"
    (read,) = qupath_read(path)
    geom = _geometry(path)
    assert geom.area > 0.2 * 2048 * 1536  # the outline is the slide's tissue, not a speck
    bounds = read.pop("first_bounds")
    assert read == {
        "file": str(path), "objects": 1, "types": {"PathAnnotationObject": 1},
        "classes": {"tissue #00a000": 1}, "locked": 1, "named": 1, "measurements": {}, "in_hierarchy": 1,
    }  # fmt: skip
    assert _bounds({"first_bounds": bounds}) == pytest.approx(geom.bounds, abs=1e-3)
    assert bounds["area"] == pytest.approx(geom.area, rel=1e-6)
    assert bounds["roi"] == ("Polygon" if isinstance(geom, Polygon) and not geom.interiors else "Geometry")


def test_synth_annotations(tmp_path: Path, qupath_read) -> None:
    """A cohort's lesion files, and the geometry kinds ``write_annotations`` writes."""
    manifest = make_cohort(tmp_path / "cohort", 3, 1024, 1024, seed=5)
    files = sorted((manifest.parent / "annotations").glob("*.geojson"))
    assert len(files) == 3
    for path, read in zip(files, qupath_read(*files), strict=True):
        n = len(json.loads(path.read_text())["features"])
        assert read["objects"] == read["in_hierarchy"] == n, read
        if n:
            assert read["types"] == {"PathAnnotationObject": n} and read["classes"] == {"lesion #ff0000": n}
            assert read["locked"] == 0 and read["measurements"] == {}
    assert any(json.loads(p.read_text())["features"] for p in files)  # some slide has a lesion

    square = box(100, 200, 300, 400)
    with_hole = square.difference(box(150, 250, 200, 300))
    two = shapely.MultiPolygon([box(500, 500, 510, 520), box(600, 600, 640, 610)])
    kinds = {
        "square": ([square], "Rectangle"),
        "hole": ([with_hole], "Geometry"),
        "multi": ([two], "Geometry"),
    }
    paths = []
    for name, (polys, _) in kinds.items():
        paths.append(tmp_path / f"{name}.geojson")
        write_annotations(paths[-1], polys, name="tumour", color=(10, 20, 30))
    for (polys, roi), read in zip(kinds.values(), qupath_read(*paths), strict=True):
        assert read["objects"] == 1 and read["classes"] == {"tumour #0a141e": 1}
        assert read["first_bounds"]["roi"] == roi
        assert _bounds(read) == pytest.approx(polys[0].bounds)
        assert read["first_bounds"]["area"] == polys[0].area
