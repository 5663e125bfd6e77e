"""Label masks to QuPath annotations: exact pixel-edge polygons, rasterised back to the mask; QuPath
reads the files (``../shared/tools/qupath-geojson``); the real WSSS4LUAD masks round-trip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from wsi_scaat.annotations import coverage_fraction, read_annotations
from wsi_scaat.annotations_from_masks import (
    MaskError,
    mask_features,
    masks_to_geojson,
    parse_classes,
    parse_values,
    read_label_image,
    region_polygons,
)
from wsi_scaat.evaluation.groundtruth import LesionRegion

from conftest import REPO

WSSS4LUAD = REPO.parent / "shared" / "data" / "wsss4luad"
QUPATH_READ = REPO.parent / "shared" / "tools" / "qupath-geojson" / "qupath-read"
PALETTE = [0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255]


def rasterise(polygons: list, shape: tuple[int, int], downsample: float = 1.0) -> np.ndarray:
    """The mask pixels whose level-0 centre lies in the polygons (the evaluation's ground truth)."""
    return LesionRegion(polygons).grid_mask((0, shape[0]), (0, shape[1]), downsample)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def palette_png(path: Path, labels: np.ndarray) -> Path:
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(PALETTE)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def qupath_read() -> Path:
    """QuPath's own GeoJSON reader; skips when it or Java is absent."""
    if not QUPATH_READ.is_file():
        pytest.skip(f"QuPath reader not found at {QUPATH_READ}")
    if shutil.which("java") is None:
        pytest.skip("java not found: QuPath's reader needs Java 17")
    jars = [Path("/usr/share/java") / j for j in ("gson.jar", "jts-core.jar", "slf4j-api.jar")]
    if not all(j.is_file() for j in jars):
        pytest.skip(
            f"QuPath's reader needs {', '.join(map(str, jars))} (Debian: libgoogle-gson-java, libjts-java)"
        )
    return QUPATH_READ


def test_exact_geometry_of_small_masks() -> None:
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    (poly,) = region_polygons(ring)
    assert poly.bounds == (0, 0, 3, 3) and poly.area == 8
    assert [tuple(sorted(set(h.coords))) for h in poly.interiors] == [((1, 1), (1, 2), (2, 1), (2, 2))]
    diagonal = np.eye(2, dtype=bool)  # touching at a corner only: two 4-connected regions
    assert sorted(p.bounds for p in region_polygons(diagonal)) == [(0, 0, 1, 1), (1, 1, 2, 2)]
    ell = np.array([[1, 0], [1, 1]], bool)  # a concave corner: traced along the pixel edges
    (poly,) = region_polygons(ell, downsample=4)
    assert poly.area == 3 * 16 and len(poly.exterior.coords) == 7  # six corners, closed
    assert set(poly.exterior.coords) == {(0, 0), (4, 0), (4, 4), (8, 4), (8, 8), (0, 8)}
    single = np.zeros((5, 5), bool)
    single[4, 2] = True
    assert [p.bounds for p in region_polygons(single, 2.5)] == [(5.0, 10.0, 7.5, 12.5)]
    assert region_polygons(np.zeros((3, 3), bool)) == []


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("downsample", [1.0, 4.0, 2.5])
def test_rasterising_reproduces_random_masks(seed: int, downsample: float) -> None:
    """Exactly, pixel for pixel, also for noise with pinches, holes in holes and one-pixel lines."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 48, 2)
    mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
    if seed % 2:
        mask = ndimage.binary_opening(mask)
    polygons = region_polygons(mask, downsample)
    assert all(p.is_valid and p.exterior.is_ccw for p in polygons)
    np.testing.assert_array_equal(rasterise(polygons, mask.shape, downsample), mask)
    assert sum(p.area for p in polygons) == pytest.approx(mask.sum() * downsample**2)
    labels, n = ndimage.label(mask)  # 4-connected components: one polygon each
    assert len(polygons) == n


def test_cli_palette_png_per_class_iou_and_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    labels = ndimage.zoom(rng.integers(0, 4, (12, 16)), 5, order=0)  # blocks of 5 px
    labels[rng.random(labels.shape) < 0.05] = 3  # speckle of background
    mask = palette_png(tmp_path / "mask.png", labels)
    out = tmp_path / "ann.geojson"
    run = subprocess.run([sys.executable, "-m", "wsi_scaat", "masks-to-geojson", str(mask), "--out", str(out),
                          "--classes", "0=tumour,1=stroma,2=normal", "--ignore", "3", "--downsample", "4"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    n = {name: 0 for name in ("tumour", "stroma", "normal")}
    for feat in doc["features"]:
        props = feat["properties"]
        assert props["objectType"] == "annotation" and feat["geometry"]["type"] == "Polygon"
        n[props["classification"]["name"]] += 1
    counts = f"tumour {n['tumour']}, stroma {n['stroma']}, normal {n['normal']}"
    assert run.stdout.strip() == f"{out}: {sum(n.values())} regions ({counts})"
    colours = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
               for f in doc["features"]}  # fmt: skip
    assert colours == {"tumour": [0, 64, 128], "stroma": [64, 128, 0], "normal": [243, 152, 0]}
    for value, name in enumerate(("tumour", "stroma", "normal")):
        polygons = read_annotations(out, name)
        truth = labels == value
        assert iou(rasterise(polygons, labels.shape, 4.0), truth) == 1.0  # the issue asks >= 0.99
        # the tiler's lesion fraction of a level-0 square is the class's pixel share
        frac = coverage_fraction(polygons, np.array([[0, 0], [40, 20]]), 40.0)
        np.testing.assert_allclose(frac, [truth[:10, :10].mean(), truth[5:15, 10:20].mean()], atol=1e-6)
    before = out.stat().st_mtime_ns
    masks_to_geojson(mask, out, {0: "tumour", 1: "stroma", 2: "normal"}, {3}, 4.0)
    assert out.stat().st_mtime_ns == before  # unchanged content: not rewritten


def test_grey_tiff_and_default_colours(tmp_path: Path) -> None:
    labels = np.zeros((20, 30), np.uint16)
    labels[5:15, 5:12] = 7
    path = tmp_path / "labels.tiff"
    tifffile.imwrite(path, labels)
    image = read_label_image(path)
    assert image.palette is None and image.labels.dtype == np.uint16
    feats = mask_features(image, {7: "tumour", 0: "other"})
    names = [f["properties"]["classification"]["name"] for f in feats]
    assert names == ["other", "tumour"]  # by label value
    assert feats[1]["properties"]["classification"]["color"] == [255, 127, 14]
    assert feats[0]["geometry"]["coordinates"][1:]  # the 'other' region has the tumour as a hole


def test_unaccounted_values_and_bad_input_are_errors(tmp_path: Path) -> None:
    mask = palette_png(tmp_path / "m.png", np.array([[0, 1], [3, 2]]))
    with pytest.raises(
        MaskError, match=r"m.png: values \[2, 3\] are neither in --classes \(0,1\) nor in --ignore"
    ):
        masks_to_geojson(mask, tmp_path / "o.geojson", {0: "tumour", 1: "stroma"})
    assert not (tmp_path / "o.geojson").exists()
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(rgb)
    with pytest.raises(MaskError, match="rgb.png: not a label image"):
        read_label_image(rgb)
    run = subprocess.run([sys.executable, "-m", "wsi_scaat", "masks-to-geojson", str(mask), "--out",
                          str(tmp_path / "o.geojson"), "--classes", "0=tumour,1=stroma"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "m.png: values [2, 3]" in run.stderr
    assert parse_classes("0=tumour, 1=stroma") == {0: "tumour", 1: "stroma"}
    assert parse_values(["3", "4,5"]) == {3, 4, 5}
    for bad in ("0=tumour,0=stroma", "0=a,1=a", "x=tumour", "0", ""):
        with pytest.raises(ValueError):
            parse_classes(bad)
    with pytest.raises(ValueError, match="both classes and ignored"):
        mask_features(read_label_image(mask), {0: "a", 1: "b", 2: "c", 3: "d"}, {3})


def test_qupath_reads_the_annotations(tmp_path: Path, qupath_read: Path) -> None:
    labels = np.full((30, 40), 3)
    labels[2:12, 3:20] = 0  # tumour, with a one-pixel hole of stroma
    labels[6, 8] = 1
    labels[15:28, 10:35] = 1
    labels[20:24, 15:18] = 2  # normal inside stroma: a hole of the stroma region
    mask = palette_png(tmp_path / "mask.png", labels)
    out = tmp_path / "mask.geojson"
    masks_to_geojson(mask, out, parse_classes("0=tumour,1=stroma,2=normal"), {3}, downsample=2.0)
    run = subprocess.run([str(qupath_read), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["objects"] == got["in_hierarchy"] == 4 and got["types"] == {"PathAnnotationObject": 4}
    assert got["classes"] == {"tumour #004080": 1, "stroma #408000": 2, "normal #f39800": 1}
    first = got["first_bounds"]  # the tumour region, level-0 pixels (downsample 2)
    assert (first["x"], first["y"], first["width"], first["height"]) == (6.0, 4.0, 34.0, 20.0)
    assert first["area"] == (10 * 17 - 1) * 4 and first["roi"] == "Geometry"  # QuPath's ROI with holes


@pytest.fixture(scope="module")
def wsss4luad() -> Path:
    if not (WSSS4LUAD / "mask").is_dir():
        pytest.skip(f"WSSS4LUAD crops not found at {WSSS4LUAD}")
    return WSSS4LUAD


@pytest.mark.parametrize("stem", ["00", "01", "68"])
def test_wsss4luad_masks_round_trip(wsss4luad: Path, tmp_path: Path, stem: str) -> None:
    """Real label masks (palette PNGs): per class, the rasterised annotations are the mask."""
    image = read_label_image(wsss4luad / "mask" / f"{stem}.png")
    classes = {0: "tumour", 1: "stroma", 2: "normal"}
    out = tmp_path / f"{stem}.geojson"
    counts = masks_to_geojson(wsss4luad / "mask" / f"{stem}.png", out, classes, {3})
    for value, name in classes.items():
        truth = image.labels == value
        assert (counts[name] > 0) == truth.any()
        assert iou(rasterise(read_annotations(out, name), truth.shape), truth) == (
            1.0 if truth.any() else 0.0
        )
