"""Review exports: OME-TIFF heatmaps line up with the slide, PNGs share one grid, QuPath GeoJSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import zarr
from shapely.geometry import Point, shape

from wsi_scaat.heatmaps import export, figures, geojson, ometiff
from wsi_scaat.saliency.store import create_saliency_store

W, H, MPP = 1024, 768, 0.5
PATCH0, MAP = 128, 16  # level-0 patch side, map side: hd = 8
HD = PATCH0 // MAP
LOW, HIGH = 0.0, 2.0  # the heatmap's normalisation: value = raw / 2
SQUARE = (256, 512, 384, 640)  # bright square in level-0 px: y0, y1, x0, x1 (2 x 2 patches)
TISSUE_X0 = 128  # no tissue (and no patches) left of this
CLASSES = ["normal", "tumour"]


def _value(y: int, x: int) -> float:
    """The heatmap's value at a level-0 position."""
    if x < TISSUE_X0:
        return 0.0
    y0, y1, x0, x1 = SQUARE
    return 0.9 if (y0 <= y < y1 and x0 <= x < x1) else 0.1


def _write_heatmap(path: Path, attrs: dict) -> np.ndarray:
    """A heatmap pyramid per the contract (level 0 is already <= 512 px: one level)."""
    level0 = np.array([[_value(r * HD, c * HD) for c in range(W // HD)] for r in range(H // HD)], np.float32)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("0", data=level0, chunks=(64, 64))
    scale = MPP * HD
    root.attrs.update(
        attrs
        | {
            "heatmap_downsample": float(HD),
            "level_downsamples": [1],
            "window": "hann",
            "heatmap_version": 1,
            "normalization": {
                "method": "percentile",
                "low_percentile": 1.0,
                "high_percentile": 99.0,
                "low": LOW,
                "high": HIGH,
            },
            "multiscales": [
                {
                    "axes": [
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [{"type": "scale", "scale": [scale, scale]}],
                        }
                    ],
                }
            ],
        }
    )
    return level0


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Slide, saliency store and heatmap of one synthetic slide, and its exports."""
    from wsi_scaat.synth import make_slide

    folder = tmp_path_factory.mktemp("export")
    slide = folder / "s1.tiff"
    make_slide(slide, W, H, seed=1, mpp=MPP, lesions=False)
    xs, ys = np.meshgrid(np.arange(TISSUE_X0, W, PATCH0), np.arange(0, H, PATCH0))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    bright = np.array([_value(y, x) > 0.5 for x, y in coords])
    maps = np.where(bright, 0.9 * HIGH, 0.1 * HIGH)[:, None, None] * np.ones((1, MAP, MAP))
    maps[:, 0, 0] *= 1.5  # a max above the mean (0.15 or 1.0 after normalisation)
    probs = np.stack([1 - np.where(bright, 0.8, 0.2), np.where(bright, 0.8, 0.2)], 1)
    tissue = np.ones((H // 32, W // 32), np.uint8)
    tissue[:, : TISSUE_X0 // 32] = 0
    attrs = {
        "slide_id": "s1",
        "source_path": str(slide),
        "slide_width": W,
        "slide_height": H,
        "mpp_level0": MPP,
        "patch_size": 64,
        "patch_size_level0": PATCH0,
        "map_size": MAP,
        "map_downsample": 4,
        "class_names": CLASSES,
        "saliency_method": "gradient",
        "saliency_target": "predicted",
        "model_method": "scaat",
        "tissue_downsample": 32.0,
    }
    store = folder / "s1.saliency.zarr"
    with create_saliency_store(store, len(coords), 2, MAP, attrs) as writer:
        writer.write_array("coords", coords)
        writer.write_array("tissue_mask", tissue)
        writer.write(0, maps, probs, np.argmax(probs, 1))
    heatmap = folder / "s1.heatmap.zarr"
    level0 = _write_heatmap(heatmap, attrs)
    out = export.export_slide(
        heatmap,
        store,
        folder / "out",
        thumbnail_size=256,
        tile_size=256,
        region_threshold=0.5,
        region_smooth_um=0.0,
    )  # exact outlines: no smoothing
    return {
        "slide": slide,
        "store": store,
        "heatmap": heatmap,
        "level0": level0,
        "coords": coords,
        "bright": bright,
        "out": out,
        "folder": folder,
    }


def test_returns_every_output(case: dict) -> None:
    out = case["out"]
    assert set(out) == {
        "ome_tiff",
        "ome_tiff_rgb",
        "thumbnail",
        "heatmap_png",
        "overlay",
        "figure",
        "tiles",
        "regions",
    }
    assert all(p.is_file() and p.name.startswith("s1.") for p in out.values())
    assert sorted(p.name for p in out["tiles"].parent.iterdir()) == sorted(p.name for p in out.values())


def test_ome_tiff_lines_up_with_slide(case: dict) -> None:
    expected = ometiff.to_uint8(np.repeat(np.repeat(case["level0"], HD, 0), HD, 1))
    for key, lut in (("ome_tiff", ometiff.GREY_LUT), ("ome_tiff_rgb", ometiff.colormap_lut("inferno"))):
        with tifffile.TiffFile(case["out"][key]) as tif:
            assert tif.is_ome and len(tif.series) == 1 and len(tif.pages) == 1  # levels are SubIFDs
            series = tif.series[0]
            assert series.axes == "YXS" and series.is_pyramidal
            assert [lv.shape for lv in series.levels] == [(H, W, 3), (H // 2, W // 2, 3)]
            pixels = re.search(r"<Pixels [^>]*>", tif.ome_metadata).group(0)
            assert 'PhysicalSizeX="0.5"' in pixels and 'PhysicalSizeY="0.5"' in pixels
            assert tif.pages[0].compression == 8 and tif.pages[0].predictor == 2  # deflate, differencing
            level0 = series.levels[0].asarray()
            assert level0.dtype == np.uint8
            np.testing.assert_array_equal(level0, lut[expected])
            np.testing.assert_array_equal(series.levels[1].asarray(), lut[expected[1::2, 1::2]])
    with tifffile.TiffFile(case["out"]["ome_tiff"]) as tif:  # grey: R = G = B = round(255 v)
        assert '<Channel ID="Channel:0:0" SamplesPerPixel="3" Name="saliency"' in tif.ome_metadata
        level0 = tif.series[0].levels[0].asarray()
    assert tuple(level0[300, 400]) == (round(255 * 0.9),) * 3 and tuple(level0[100, 200]) == (26, 26, 26)


@pytest.mark.parametrize("key", ["ome_tiff", "ome_tiff_rgb"])
def test_ome_tiff_opens_in_tiatoolbox(case: dict, key: str) -> None:
    from tiatoolbox.wsicore.wsireader import TIFFWSIReader, WSIReader

    lut = ometiff.GREY_LUT if key == "ome_tiff" else ometiff.colormap_lut("inferno")
    high, low = lut[round(255 * 0.9)], lut[round(255 * 0.1)]
    reader = WSIReader.open(case["out"][key])
    assert isinstance(reader, TIFFWSIReader)
    info = reader.info
    assert np.allclose(np.asarray(info.mpp, dtype=float), MPP) and tuple(info.slide_dimensions) == (W, H)
    assert [tuple(d) for d in info.level_dimensions] == [(W, H), (W // 2, H // 2)]
    # inside the bright square (x 384-640, y 256-512) and left of it, at four resolutions
    for resolution, units in ((0, "level"), (1, "level"), (1.0, "mpp"), (2.0, "mpp")):
        patch = reader.read_rect((400, 300), (8, 8), resolution=resolution, units=units)
        assert patch.shape == (8, 8, 3) and (patch == high).all(), (resolution, units)
        patch = reader.read_rect((160, 300), (8, 8), resolution=resolution, units=units)
        assert (patch == low).all(), (resolution, units)
    bounds = reader.read_bounds((384, 256, 640, 512), resolution=2.0, units="mpp")
    assert bounds.shape == (64, 64, 3) and (bounds[2:-2, 2:-2] == high).all()


def test_ome_tiff_level0_only_in_openslide(case: dict) -> None:
    import openslide

    for key in ("ome_tiff", "ome_tiff_rgb"):  # generic TIFF: OpenSlide does not see SubIFDs
        with openslide.OpenSlide(case["out"][key]) as slide:
            assert slide.level_count == 1 and slide.dimensions == (W, H)
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
            assert slide.properties["openslide.vendor"] == "generic-tiff"
            region = np.asarray(slide.read_region((0, 0), 0, (W, H)))
        with tifffile.TiffFile(case["out"][key]) as tif:
            np.testing.assert_array_equal(region[..., :3], tif.series[0].levels[0].asarray())


def test_ome_tiff_levels_from_the_matching_heatmap_level(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    levels = [rng.random((1200, 1000), dtype=np.float32)]
    while max(levels[-1].shape) > 512:
        v = levels[-1]
        levels.append(v.reshape(v.shape[0] // 2, 2, v.shape[1] // 2, 2).mean((1, 3)))
    path = ometiff.write_heatmap_ome_tiff(
        tmp_path / "h.ome.tif", levels, 1.0, (1000, 1200), 0.25, tile_size=128
    )
    with tifffile.TiffFile(path) as tif:
        got = [lv.asarray() for lv in tif.series[0].levels]
    assert [g.shape for g in got] == [(1200, 1000, 3), (600, 500, 3), (300, 250, 3)]
    for g, level in zip(got, levels, strict=True):
        np.testing.assert_array_equal(g, ometiff.GREY_LUT[ometiff.to_uint8(level)])
    assert ometiff.source_level(3.0, 1.0, 3) == 1 and ometiff.source_level(0.5, 1.0, 3) == 0
    half = ometiff.write_heatmap_ome_tiff(
        tmp_path / "half.ome.tif", levels, 1.0, (1000, 1200), 0.25, tile_size=128, ome_downsample=2
    )
    with tifffile.TiffFile(half) as tif:
        assert [lv.shape for lv in tif.series[0].levels] == [(600, 500, 3), (300, 250, 3)]
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray()[..., 1], ometiff.to_uint8(levels[1]))


def test_pngs_share_one_grid(case: dict) -> None:
    from PIL import Image

    out = case["out"]
    images = {k: Image.open(out[k]) for k in ("thumbnail", "heatmap_png", "overlay", "figure")}
    thumb, heat, over = (
        np.asarray(images[k].convert("RGB")) for k in ("thumbnail", "heatmap_png", "overlay")
    )
    assert thumb.shape == heat.shape == over.shape and max(thumb.shape[:2]) == 256
    ds = float(images["thumbnail"].text["downsample"])
    assert images["overlay"].text["downsample"] == images["heatmap_png"].text["downsample"] == repr(ds)
    assert images["figure"].size[0] > 1000

    def at(y: float, x: float) -> tuple[int, int]:  # level-0 position -> thumbnail pixel
        return int(y / ds), int(x / ds)

    lut = ometiff.colormap_lut("inferno")
    gain = float(images["heatmap_png"].text["display_gain"])  # display scale (see the display test)
    for (y, x), v in (((384, 512), 0.9), ((100, 250), 0.1)):  # square centre, elsewhere (bilinear)
        assert np.abs(heat[at(y, x)].astype(int) - lut[round(255 * min(1.0, v * gain))]).max() <= 3
    outside = np.zeros(thumb.shape[:2], bool)
    outside[:, : int(TISSUE_X0 / ds) - 1] = True  # no tissue
    np.testing.assert_array_equal(over[outside], thumb[outside])
    r0, c0 = at(SQUARE[0] + 16, SQUARE[2] + 16)
    r1, c1 = at(SQUARE[1] - 16, SQUARE[3] - 16)
    assert (over[r0:r1, c0:c1] != thumb[r0:r1, c0:c1]).any(axis=2).all()  # inside the square: overlaid


def test_tiles_geojson(case: dict) -> None:
    doc = json.loads(case["out"]["tiles"].read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(case["coords"])
    for feature, (x, y), bright in zip(doc["features"], case["coords"].tolist(), case["bright"], strict=True):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        assert ring == [[x, y], [x + PATCH0, y], [x + PATCH0, y + PATCH0], [x, y + PATCH0], [x, y]]
        props = feature["properties"]
        assert props["objectType"] == "tile" and props["isLocked"] is True
        m = props["measurements"]
        assert isinstance(m, dict) and set(m) == {
            "prob_normal",
            "prob_tumour",
            "saliency_mean",
            "saliency_max",
        }
        assert m["prob_tumour"] == pytest.approx(0.8 if bright else 0.2, abs=1e-4)
        assert 0.0 <= m["saliency_mean"] <= m["saliency_max"] <= 1.0
        v = 0.9 if bright else 0.1
        assert m["saliency_mean"] == pytest.approx(v + (min(1.0, 1.5 * v) - v) / MAP**2, abs=1e-3)
        assert m["saliency_max"] == pytest.approx(min(1.0, 1.5 * v), abs=1e-3)


def test_regions_geojson(case: dict) -> None:
    doc = json.loads(case["out"]["regions"].read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 1
    feature = doc["features"][0]
    poly = shape(feature["geometry"])
    y0, y1, x0, x1 = SQUARE
    assert poly.is_valid and poly.area == pytest.approx((y1 - y0) * (x1 - x0), rel=0.03)
    assert poly.contains(Point((x0 + x1) / 2, (y0 + y1) / 2))
    assert poly.bounds == pytest.approx((x0, y0, x1, y1), abs=HD)
    props = feature["properties"]
    assert props["objectType"] == "annotation" and props["classification"]["name"] == "saliency-high"
    m = props["measurements"]
    assert m["area_um2"] == pytest.approx(poly.area * MPP**2)
    assert m["saliency_mean"] == pytest.approx(0.9, abs=1e-3) and m["prob_mean"] == pytest.approx(0.8)
    assert m["n_patches"] == 4


def test_region_polygons_keep_holes_drop_specks() -> None:
    values = np.zeros((60, 80), np.float32)
    values[10:50, 10:50] = 1.0
    values[20:40, 20:40] = 0.0  # a 20 x 20 hole
    values[5:7, 70:72] = 1.0  # a 2 x 2 speck
    values[30:45, 60:75] = 0.8  # a separate region
    polys = geojson.region_polygons(values, 0.5, 4.0, min_area_px=50 * 16, tolerance=1.0)
    assert len(polys) == 2 and all(p.is_valid for p in polys)
    ring = max(polys, key=lambda p: p.area)
    assert len(ring.interiors) == 1
    assert ring.area == pytest.approx((40**2 - 20**2) * 16, rel=0.03)
    assert not ring.contains(Point(30 * 4, 30 * 4)) and ring.contains(Point(15 * 4, 15 * 4))
    assert shapely.union_all(polys).area == pytest.approx((40**2 - 20**2 + 15**2) * 16, rel=0.03)


def test_failed_export_leaves_nothing(case: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed while writing the figure")

    monkeypatch.setattr(figures, "write_figure", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        export.export_slide(case["heatmap"], case["store"], out, thumbnail_size=128, tile_size=256)
    assert list(out.iterdir()) == []


REGION_MEASUREMENTS = ("area_um2", "n_patches", "prob_mean", "saliency_max", "saliency_mean")


def test_qupath_reads_tiles_and_regions(case: dict, qupath_read) -> None:
    """QuPath's own parser (qupath-core) makes locked tiles and one saliency-high annotation."""
    tiles, regions = qupath_read(case["out"]["tiles"], case["out"]["regions"])
    n = len(case["coords"])
    assert tiles == {
        "file": str(case["out"]["tiles"]), "objects": n, "types": {"PathTileObject": n},
        "classes": {"none": n}, "locked": n, "named": n, "in_hierarchy": n,
        "measurements": {k: n for k in ("prob_normal", "prob_tumour", "saliency_max", "saliency_mean")},
        "first_bounds": {"x": float(case["coords"][0, 0]), "y": float(case["coords"][0, 1]),
                         "width": float(PATCH0), "height": float(PATCH0), "area": float(PATCH0**2),
                         "roi": "Rectangle"},
    }  # fmt: skip
    y0, y1, x0, x1 = SQUARE
    poly = shape(json.loads(case["out"]["regions"].read_text())["features"][0]["geometry"])
    bounds = regions.pop("first_bounds")
    assert regions == {
        "file": str(case["out"]["regions"]), "objects": 1, "types": {"PathAnnotationObject": 1},
        "classes": {"saliency-high #e6321e": 1}, "locked": 0, "named": 1, "in_hierarchy": 1,
        "measurements": dict.fromkeys(REGION_MEASUREMENTS, 1),
    }  # fmt: skip
    assert (bounds["x"], bounds["y"], bounds["x"] + bounds["width"], bounds["y"] + bounds["height"]) == (
        pytest.approx(poly.bounds, abs=1e-3)
    )
    assert bounds["area"] == pytest.approx(poly.area, rel=1e-6) and abs(bounds["x"] - x0) <= HD
    assert abs(bounds["y"] - y0) <= HD and abs(bounds["width"] - (x1 - x0)) <= 2 * HD


def test_qupath_reimport_keeps_user_objects(case: dict, tmp_path: Path, qupath_groovy) -> None:
    """The import script, run twice on an ``s1.ome.tif`` image with QuPath's hierarchy code.

    Between the runs a user detects a cell inside a saliency-high region (the region's child) and
    draws an annotation: the re-import replaces tiles and regions and keeps both.
    """
    import shutil

    repo = Path(__file__).resolve().parents[1]
    for key in ("tiles", "regions"):
        shutil.copy(case["out"][key], tmp_path)
    image = tmp_path / "s1.ome.tif"  # QuPath names it "s1", like the slide id
    image.write_bytes(b"")
    run = qupath_groovy(
        repo / "tests" / "qupath" / "run_import_script.groovy",
        repo / "scripts" / "qupath" / "import_wsi_scaat.groovy",
        image,
    )
    assert run.returncode == 0, run.stderr
    states = [json.loads(line[6:]) for line in run.stdout.splitlines() if line.startswith("STATE ")]
    n = len(case["coords"])
    first, added, again = states
    assert first == {"step": "first import", "objects": n + 1, "tiles": n, "regions": 1}
    assert added["cell_present"] and added["cell_parent"] == "saliency-high" and added["objects"] == n + 3
    assert again == {
        "step": "re-import", "objects": n + 3, "tiles": n, "regions": 1,
        "cell_present": True, "cell_parent": "root", "annotation_present": True,
    }  # fmt: skip
    assert f"Removed {n + 1} objects of an earlier import; kept 1 made inside them" in run.stdout
    assert "deprecated" not in run.stderr.lower()  # what qupath-core logs for its deprecated calls
    assert run.stdout.splitlines()[-1] == 'QP_CALLS ["getCurrentImageData"]'  # the rest: hierarchy calls


def _shown(case: dict, ds: float, shape: tuple[int, int], smooth_um: float, gain: float = 1.0) -> np.ndarray:
    """The heatmap values the PNGs show: resampled to the thumbnail grid, smoothed inside the tissue."""
    hm = export.open_heatmap(case["heatmap"])
    raw = figures.heatmap_image(hm.levels, hm.downsample, shape, ds)
    tissue = np.ones((H // 32, W // 32), np.uint8)
    tissue[:, : TISSUE_X0 // 32] = 0
    mask = figures.mask_image(tissue, 32.0, shape, ds)
    return figures.smooth_display(raw, mask, smooth_um / (MPP * ds), gain)


def test_display_is_smoothed_and_the_analysis_values_are_not(case: dict) -> None:
    from PIL import Image
    from scipy.ndimage import gaussian_filter1d

    heat_png = Image.open(case["out"]["heatmap_png"])
    ds = float(heat_png.text["downsample"])
    heat = np.asarray(heat_png.convert("RGB"))
    sigma = 10.0 / (MPP * ds)  # the default display_smooth_um, in thumbnail pixels (5 px here)
    assert heat_png.text["display_smooth_um"] == "10.0" and sigma == 5.0
    gain = float(heat_png.text["display_gain"])  # 1 / the 99th percentile of the smoothed tissue values
    smoothed = _shown(case, ds, heat.shape[:2], 10.0)
    tissue = np.arange(heat.shape[1])[None, :] * ds >= TISSUE_X0 + 32
    assert gain == pytest.approx(
        1 / np.percentile(smoothed[np.broadcast_to(tissue, smoothed.shape)], 99), rel=0.02
    )
    assert 1.05 < gain < 1.15  # the bright square holds 0.9, 10% of the tissue
    lut = ometiff.colormap_lut("inferno")
    shown = _shown(case, ds, heat.shape[:2], 10.0, gain)
    assert np.abs(heat.astype(int) - lut[ometiff.to_uint8(shown)]).max() <= 1
    # across the square's left edge (far from other edges), a Gaussian profile of sigma 5 px
    row, c_edge = int(384 / ds), int(SQUARE[2] / ds)
    step = np.where(np.arange(heat.shape[1]) < c_edge, 0.1, 0.9)
    expected = gaussian_filter1d(step, sigma, mode="nearest")
    cols = slice(c_edge - 15, c_edge + 15)
    assert np.abs(smoothed[row, cols] - expected[cols]).max() < 0.05
    assert 0.3 < smoothed[row, c_edge] < 0.7 and smoothed[row, c_edge - 15] < 0.12  # blurred, not blocky
    # the pyramid and the OME-TIFF keep the unsmoothed values (test_ome_tiff_lines_up_with_slide)
    with tifffile.TiffFile(case["out"]["ome_tiff"]) as tif:
        level0 = tif.series[0].levels[0].asarray()
    assert level0.shape[-1] == 3  # grey as R = G = B (tiatoolbox reads no one-channel file)
    assert (level0[384, SQUARE[2] - 1] == round(255 * 0.1)).all() and (
        level0[384, SQUARE[2]] == round(255 * 0.9)
    ).all()


def test_overlay_colours_high_values_and_leaves_low_ones(case: dict) -> None:
    """Colour distance (Euclidean, RGB 0-255) between overlay and thumbnail, with the default display:
    at least 80 on average where the shown heatmap is >= 0.6, at most 1 where it is <= 0.15, away from
    the region outlines (3 px)."""
    from PIL import Image

    thumb_png, over_png = Image.open(case["out"]["thumbnail"]), Image.open(case["out"]["overlay"])
    ds = float(over_png.text["downsample"])
    thumb, over = (np.asarray(im.convert("RGB")).astype(np.float64) for im in (thumb_png, over_png))
    shown = _shown(case, ds, thumb.shape[:2], 10.0, float(over_png.text["display_gain"]))
    dist = np.linalg.norm(over - thumb, axis=2)
    region = shape(json.loads(case["out"]["regions"].read_text())["features"][0]["geometry"])
    rr, cc = np.mgrid[0 : thumb.shape[0], 0 : thumb.shape[1]]
    centres = shapely.points((cc.ravel() + 0.5) * ds, (rr.ravel() + 0.5) * ds)
    near = (shapely.distance(region.boundary, centres) <= 3 * ds).reshape(thumb.shape[:2])
    high, low = (shown >= 0.6) & ~near, (shown <= 0.15) & ~near & (cc * ds >= TISSUE_X0)
    assert high.sum() > 1000 and low.sum() > 10000
    print(f"colour distance: {dist[high].mean():.1f} on high pixels, {dist[low].mean():.2f} on low ones")
    assert dist[high].mean() >= 80 and dist[low].mean() <= 1
    # the outlines of the saliency-high regions are drawn on the overlay
    outline = over[..., 1] - np.maximum(over[..., 0], over[..., 2]) > 60  # green: only the outline is
    assert export.REGION_OUTLINE_COLOR[1] - max(export.REGION_OUTLINE_COLOR[::2]) > 60
    assert outline[near].sum() > 100 and not outline[~near].any()
    assert over_png.text["meaning"] == "predicted-class saliency (|attribution|)"


def test_figure_outlines_the_annotations(case: dict, tmp_path: Path) -> None:
    from PIL import Image
    from shapely.geometry import box

    from wsi_scaat.synth import write_annotations

    ann = tmp_path / "s1.geojson"
    write_annotations(ann, [box(SQUARE[2] + 64, SQUARE[0], SQUARE[3] + 64, SQUARE[1])])
    out = export.export_slide(case["heatmap"], case["store"], tmp_path / "out", thumbnail_size=256,
                              tile_size=256, annotations=ann)  # fmt: skip

    def truth_pixels(path: Path) -> int:
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(rgb - np.array(export.ANNOTATION_COLOR)).max(axis=2) <= 30).sum())

    assert truth_pixels(out["figure"]) > 300 and truth_pixels(case["out"]["figure"]) == 0
    assert truth_pixels(out["overlay"]) == 0  # ground truth only in the review figure
