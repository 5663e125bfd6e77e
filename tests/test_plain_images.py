"""Plain images as slides: PNG and JPEG through the reader fallback, and a cohort of PNG crops (mpp from
the manifest) through every stage of the workflow: tile, train, saliency, stitch, export, evaluate."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from PIL import Image

from wsi_scaat.errors import MppUnknownError, SlideOpenError, SlideReadError
from wsi_scaat.slides import image_backend, open_slide
from wsi_scaat.slides.tiling import plan_grid
from wsi_scaat.store import open_store

from conftest import REPO


def _image(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_is_a_one_level_slide_without_mpp(tmp_path: Path) -> None:
    image = _image()
    path = tmp_path / "crop.png"
    Image.fromarray(image).save(path)
    with open_slide(path) as reader:
        info = reader.info
        assert (info.width, info.height, info.level_count, info.backend, info.vendor) == (
            120,
            90,
            1,
            "image",
            "png",
        )
        assert info.mpp is None and info.mpp_source == "unknown"
        with pytest.raises(MppUnknownError, match="crop.png.*--mpp-override"):
            plan_grid(info, 32, 1.0)
        np.testing.assert_array_equal(reader.read_region((10, 20), 0, (50, 40)), image[20:60, 10:60])
        edge = reader.read_region((100, -5), 0, (30, 20))  # outside the image: white, as on glass
        np.testing.assert_array_equal(edge[5:, :20], image[:15, 100:])
        assert (edge[:5] == 255).all() and (edge[:, 20:] == 255).all()
        thumb, ds = reader.read_thumbnail(3)
        assert ds == 3 and thumb.shape == (30, 40, 3)
        assert np.abs(thumb[4, 7].astype(float) - image[12:15, 21:24].reshape(-1, 3).mean(0)).max() <= 1
    with open_slide(path, mpp_override=0.5) as reader:
        assert reader.info.require_mpp() == 0.5 and reader.info.mpp_source == "override"
        grid = plan_grid(reader.info, 32, 1.0)  # 64 level-0 px per patch
        assert grid.patch_size_level0 == 64 and len(grid.coords) == 1 and grid.resample


def test_jpeg_grey_and_transparent_pngs(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(40, 220, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    Image.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)
    with open_slide(tmp_path / "c.jpg") as reader:
        assert reader.info.vendor == "jpeg"
        assert np.abs(reader.read_region((0, 0), 0, (64, 48)).astype(int) - smooth).max() <= 4
    Image.fromarray(smooth[..., 0]).save(tmp_path / "g.png")
    with open_slide(tmp_path / "g.png") as reader:
        np.testing.assert_array_equal(reader.read_region((0, 0), 0, (64, 48)), smooth)
    rgba = np.dstack(
        [np.full((4, 4, 3), 100, np.uint8), np.array([0, 255, 128, 255] * 4, np.uint8).reshape(4, 4)]
    )
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as reader:
        row = reader.read_region((0, 0), 0, (4, 1))[0, :, 0]
    np.testing.assert_array_equal(row, [255, 100, 177, 100])  # over white: 100 a + 255 (1 - a)


def test_bad_plain_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(_image(64, 64)).save(path)
    monkeypatch.setattr(image_backend, "MAX_PIXELS", 64 * 63)
    with pytest.raises(SlideOpenError, match="big.png: plain image of 64 x 64 px.*tiled pyramidal TIFF"):
        open_slide(path)
    monkeypatch.undo()
    buf = io.BytesIO()
    Image.fromarray(_image(200, 200)).save(buf, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a header, half the pixels
    with open_slide(cut) as reader, pytest.raises(SlideReadError, match="cut.png: cannot read pixels"):
        reader.read_region((0, 0), 0, (10, 10))
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(SlideOpenError, match="fake.png: cannot open as a slide.*image:"):
        open_slide(fake)


def test_readers_share_one_decoded_image(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    Image.fromarray(_image()).save(path)
    a, b = open_slide(path), open_slide(path)
    a.read_region((0, 0), 0, (4, 4))
    b.read_region((0, 0), 0, (4, 4))
    (entry,) = image_backend._SHARED.values()
    assert entry[1] == 2 and a._image() is b._image()
    a.close()
    a.close()  # twice: counted once
    assert entry[1] == 1
    b.close()
    assert not image_backend._SHARED


def test_tile_cli_on_a_png_with_annotations_of_a_named_class(tmp_path: Path) -> None:
    """--mpp-override gives the PNG its resolution; --annotation-class picks the annotations' class."""
    from wsi_scaat.annotations_from_masks import masks_to_geojson

    image = np.full((128, 192, 3), 235, np.uint8)
    image[16:112, 16:176] = (150, 60, 140)  # tissue
    Image.fromarray(image).save(tmp_path / "crop.png")
    labels = np.full((128, 192), 3, np.uint8)
    labels[16:112, 16:176] = 1
    labels[16:80, 16:80] = 0
    Image.fromarray(labels).save(tmp_path / "mask.png")
    masks_to_geojson(tmp_path / "mask.png", tmp_path / "crop.geojson", {0: "tumour", 1: "stroma"}, {3})
    base = [sys.executable, "-m", "wsi_scaat", "tile", str(tmp_path / "crop.png"), "--patch-size", "32",
            "--target-mpp", "1", "--mpp-override", "1", "--thumbnail-mpp", "2", "--tissue-min-area-um2",
            "100", "--annotations", str(tmp_path / "crop.geojson"), "--no-progress"]  # fmt: skip
    for cls, out in (("tumour", "t"), ("lesion", "l")):
        args = [*base, "--annotation-class", cls, "--out", str(tmp_path / out)]
        run = subprocess.run(args, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    with open_store(tmp_path / "t" / "crop.h5") as store:
        coords, fraction, labels_ = store.coords, store.array("lesion_fraction"), store.array("labels")
        assert store.attrs["reader_backend"] == "image" and store.attrs["mpp_level0"] == 1.0
    inside = (
        (coords[:, 0] >= 16) & (coords[:, 0] + 32 <= 80) & (coords[:, 1] >= 16) & (coords[:, 1] + 32 <= 80)
    )
    assert inside.any() and (fraction[inside] == 1).all() and (labels_ == (fraction >= 0.5)).all()
    expected = [((labels[y : y + 32, x : x + 32] == 0).mean()) for x, y in coords]
    np.testing.assert_allclose(fraction, expected, atol=1e-6)
    with open_store(tmp_path / "l" / "crop.h5") as store:
        assert (store.array("lesion_fraction") == 0).all()  # no 'lesion' annotations in this file


@pytest.fixture(scope="module")
def png_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic cohort's slides saved as PNG crops; the manifest gives their mpp (0.5)."""
    from wsi_scaat.synth import make_cohort

    root = tmp_path_factory.mktemp("png")
    manifest = make_cohort(root / "synth", 5, 768, 640, seed=4)
    rows = list(csv.DictReader(manifest.open()))
    out = root / "cohort"
    (out / "img").mkdir(parents=True)
    for row in rows:
        with open_slide(manifest.parent / row["path"]) as reader:
            rgb = reader.read_region((0, 0), 0, (reader.info.width, reader.info.height))
        Image.fromarray(rgb).save(out / "img" / f"{row['slide_id']}.png")
        row["path"], row["mpp"] = f"img/{row['slide_id']}.png", "0.5"
        row["annotations"] = (
            str((manifest.parent / row["annotations"]).resolve()) if row["annotations"] else ""
        )
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "path", "split", "label", "annotations", "mpp"])
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in writer.fieldnames} for row in rows)
    return out / "manifest.csv"


@pytest.mark.slow
def test_workflow_on_png_crops(png_cohort: Path, tmp_path: Path) -> None:
    """Every stage on PNGs: stores at the manifest's mpp, heatmaps and exports of the image's size."""
    cfg = {
        "cohort": {"name": "png", "manifest": str(png_cohort)},
        "results_dir": str(tmp_path / "results"),
        "tissue": {"thumbnail_mpp": 4.0},
        "tiling": {"patch_size": 32, "target_mpp": 2.0, "min_tissue": 0.3, "overlap": 16},
        "train": {"methods": ["erm"], "device": "cpu", "epochs": 1, "batch_size": 32,
                  "model": {"name": "small_cnn", "width": 8}, "ignore_band": [0.2, 0.8]},
        "saliency": {"target": "lesion", "splits": ["test"]},
        "export": {"thumbnail_size": 256},
        "evaluate": {"max_patches": 16, "deletion_steps": 4, "road_percentages": [0.5]},
    }  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "2",
            "--configfile", str(config)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = tmp_path / "results" / "png"
    test_ids = [r["slide_id"] for r in csv.DictReader(png_cohort.open()) if r["split"] == "test"]
    assert test_ids
    for sid in test_ids:
        with open_store(res / "tiles" / f"{sid}.h5") as store:
            attrs = store.attrs
            assert attrs["reader_backend"] == "image" and attrs["mpp_source"] == "override"
            assert (
                attrs["mpp_level0"] == 0.5
                and attrs["patch_size_level0"] == 128
                and attrs["step_level0"] == 64
            )
            assert (attrs["slide_width"], attrs["slide_height"]) == (768, 640) and "lesion_fraction" in store
        heat = zarr.open_group(str(res / "heatmaps" / "erm" / f"{sid}.heatmap.zarr"), mode="r")
        hd = float(heat.attrs["heatmap_downsample"])
        assert heat["0"].shape == (math.ceil(640 / hd), math.ceil(768 / hd))
        export = res / "export" / "erm"
        with tifffile.TiffFile(export / f"{sid}.heatmap.ome.tif") as tif:
            series = tif.series[0]
            dims = dict(zip(series.axes, series.shape, strict=True))
            assert (dims["Y"], dims["X"]) == (640, 768)
        for kind in ("tiles.geojson", "regions.geojson", "overlay.png", "thumbnail.png", "figure.png"):
            assert (export / f"{sid}.{kind}").stat().st_size > 0, kind
        with Image.open(export / f"{sid}.overlay.png") as overlay:
            assert overlay.size[0] / overlay.size[1] == pytest.approx(768 / 640, rel=0.02)
    log = (res / "logs" / "train" / "erm.log").read_text()
    assert "mixed left out" in log
    rows = list(csv.DictReader((res / "evaluation" / "metrics.csv").open()))
    assert [r["model"] for r in rows] == ["erm"] and 0 <= float(rows[0]["accuracy"]) <= 1
