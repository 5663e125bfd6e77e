"""Slide reading: both backends, metadata, mpp handling and bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from wsi_scaat.errors import MppUnknownError, SlideOpenError, SlideReadError
from wsi_scaat.slides import open_slide

from conftest import write_plain_tiff


def test_real_svs_metadata_and_pixels(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as reader:
        info = reader.info
        assert (info.width, info.height, info.level_count) == (2220, 2967, 1)
        assert info.mpp == pytest.approx(0.499) and info.mpp_source == "metadata"
        assert info.backend == "openslide" and info.objective_power == 20
        region = reader.read_region((1000, 1500), 0, (300, 200))
    ref = np.asarray(openslide.OpenSlide(str(cmu_slide)).read_region((1000, 1500), 0, (300, 200)))
    assert region.shape == (200, 300, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region, ref[..., :3])


def test_boxes_tiff_matches_reference_png(slides_dir: Path) -> None:
    with open_slide(slides_dir / "openslide-boxes.tiff") as reader:
        w, h = reader.info.width, reader.info.height
        got = reader.read_region((0, 0), 0, (w, h))
    ref = np.asarray(Image.open(slides_dir / "openslide-boxes.png").convert("RGB"))
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


def test_outside_slide_is_white(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as reader:
        region = reader.read_region((2200, 2950), 0, (64, 64))
    assert (region[30:, 30:] == 255).all()


def test_thumbnail_is_block_average(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as reader:
        thumb, ds = reader.read_thumbnail(16)
        assert ds == 16 and thumb.shape == (2967 // 16, 2220 // 16, 3)
        block = reader.read_region((160, 320), 0, (16, 16)).reshape(-1, 3).mean(0)
    assert np.abs(thumb[20, 10].astype(float) - block).max() <= 1.0


def test_tiatoolbox_fallback_for_plain_tiff(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    path = write_plain_tiff(tmp_path / "plain.tiff", image, mpp=0.25)
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    with open_slide(path) as reader:
        assert reader.info.backend == "tiatoolbox"
        assert (reader.info.width, reader.info.height) == (400, 300)
        assert reader.info.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(reader.read_region((50, 20), 0, (100, 80)), image[20:100, 50:150])


def test_missing_mpp_error_and_override(tmp_path: Path) -> None:
    path = write_plain_tiff(tmp_path / "nompp.tiff", np.full((64, 64, 3), 200, np.uint8), mpp=None)
    with open_slide(path) as reader:
        assert reader.info.mpp is None and reader.info.mpp_source == "unknown"
        with pytest.raises(MppUnknownError) as err:
            reader.info.require_mpp()
    msg = str(err.value)
    assert "nompp.tiff" in msg and "--mpp-override" in msg and "mpp" in msg
    with open_slide(path, mpp_override=0.5) as reader:
        assert reader.info.require_mpp() == 0.5 and reader.info.mpp_source == "override"


@pytest.mark.parametrize(
    ("name", "error", "cause"),
    [
        ("broken.svs", SlideOpenError, "cannot open"),
        ("openslide-unopenable.tiff", SlideReadError, "cannot read"),
        ("openslide-unreadable.svs", SlideReadError, "cannot read"),
    ],
)
def test_bad_shared_files(slides_dir: Path, name: str, error: type, cause: str) -> None:
    with pytest.raises(error) as err, open_slide(slides_dir / name) as reader:
        reader.read_region((0, 0), 0, (reader.info.width, reader.info.height))
    assert name in str(err.value) and cause in str(err.value)
    assert "\n" not in str(err.value)


def test_zero_byte_and_truncated(tmp_path: Path, cmu_slide: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(SlideOpenError, match="empty.svs: empty file"):
        open_slide(empty)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(cmu_slide.read_bytes()[:400_000])
    with (
        pytest.raises((SlideOpenError, SlideReadError), match="truncated.svs"),
        open_slide(truncated) as reader,
    ):
        reader.read_thumbnail(4)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="file not found"):
        open_slide(tmp_path / "nope.svs")


def test_copy_keeps_metadata(tmp_path: Path, cmu_slide: Path) -> None:
    copy = tmp_path / "name with spaces é.svs"
    shutil.copy(cmu_slide, copy)
    with open_slide(copy) as reader:
        assert reader.info.width == 2220
