"""The patch grid (exact numbers), the tiler's output contract, atomicity and determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely

from wsi_scaat.annotations import coverage_fraction, read_annotations
from wsi_scaat.errors import SlideReadError
from wsi_scaat.slides.reader import SlideInfo
from wsi_scaat.slides.tiling import TileParams, default_slide_id, group_regions, plan_grid, tile_slide
from wsi_scaat.store import open_store
from wsi_scaat.store.patch_store import REQUIRED_ATTRS


def _info(w: int = 1000, h: int = 800, mpp: float = 0.5, downsamples=(1.0, 4.0)) -> SlideInfo:
    dims = tuple((int(w // d), int(h // d)) for d in downsamples)
    return SlideInfo("mem", w, h, dims, tuple(downsamples), mpp, "metadata", None, "test", "test")


def test_grid_at_level0() -> None:
    grid = plan_grid(_info(), 100, 0.5)
    assert len(grid.coords) == 10 * 8 and grid.level == 0 and not grid.resample
    assert grid.coords[:3].tolist() == [[0, 0], [100, 0], [200, 0]]  # row-major
    assert grid.coords[-1].tolist() == [900, 700] and grid.patch_size_level0 == 100


def test_grid_uses_pyramid_level() -> None:
    grid = plan_grid(_info(), 100, 2.0)  # downsample 4 -> level 1 (250 x 200)
    assert (grid.level, grid.crop_size, grid.patch_size_level0) == (1, 100, 400)
    assert grid.coords.tolist() == [[0, 0], [400, 0], [0, 400], [400, 400]]


def test_grid_resamples_between_levels() -> None:
    grid = plan_grid(_info(), 100, 1.0)  # downsample 2: read level 0, 200-px crops
    assert (grid.level, grid.crop_size, grid.patch_size_level0) == (0, 200, 200)
    assert grid.resample and len(grid.coords) == 5 * 4


def test_grid_field_of_view_is_the_crop() -> None:
    grid = plan_grid(_info(2000, 1600), 101, 2.6)  # downsample 5.2: level 1, 131.3 -> 131-px crops
    assert (grid.level, grid.crop_size, grid.patch_size_level0) == (1, 131, 524)  # not round(101 x 5.2)


def test_default_slide_id_strips_multipart_extensions() -> None:
    names = ["a.svs", "b.ome.tif", "c.OME.TIFF", "d.tiff", "e.v2.ndpi", ".ome.tif", "f.ome.zarr"]
    assert [default_slide_id(Path(n)) for n in names] == ["a", "b", "c", "d", "e.v2", ".ome", "f"]


def test_grid_overlap() -> None:
    grid = plan_grid(_info(), 100, 0.5, overlap=50)
    assert grid.step_level0 == 50 and len(grid.coords) == 19 * 15


def test_grid_snaps_to_close_level() -> None:
    grid = plan_grid(_info(2220, 2967, 0.499, (1.0,)), 256, 0.5)
    assert not grid.resample and grid.downsample == 1.0
    assert len(grid.coords) == 8 * 11


def test_regions_partition_the_grid() -> None:
    grid = plan_grid(_info(5000, 3000, 0.5, (1.0,)), 128, 0.5)
    groups = group_regions(grid, 1024)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(grid.coords)))
    assert max(len(g) for g in groups) == 64  # 8 x 8 patches of 128 px per 1024-px region


def test_real_slide_grid_and_pixels(cmu_slide: Path, tmp_path: Path) -> None:
    store_path = tile_slide(cmu_slide, tmp_path, TileParams(patch_size=256, target_mpp=0.5), progress=False)
    assert store_path == tmp_path / "cmu-1-small-region.h5"
    assert (tmp_path / "cmu-1-small-region.tissue.png").is_file()
    assert (tmp_path / "cmu-1-small-region.tissue.geojson").is_file()
    slide = openslide.OpenSlide(str(cmu_slide))
    with open_store(store_path) as store:
        a = store.attrs
        assert a["patch_size"] == 256 and a["patch_level"] == 0 and a["patch_size_level0"] == 256
        assert a["mpp_level0"] == pytest.approx(0.499) and a["target_mpp"] == 0.5
        assert (a["slide_width"], a["slide_height"]) == (2220, 2967)
        coords = store.coords
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert (coords % 256 == 0).all() and (coords[:, 0] <= 2220 - 256).all()
        assert 20 <= len(coords) <= 60  # tissue patches of the 8 x 11 grid
        assert store.imgs.shape == (len(coords), 256, 256, 3) and store.imgs.chunks == (1, 256, 256, 3)
        for i in (0, len(coords) // 2, len(coords) - 1):
            x, y = (int(v) for v in coords[i])
            ref = np.asarray(slide.read_region((x, y), 0, (256, 256)))[..., :3]
            np.testing.assert_array_equal(store.imgs[i], ref)


def test_store_contract_with_annotations(synth_slide: tuple[Path, Path], tmp_path: Path) -> None:
    slide, ann = synth_slide
    params = TileParams(patch_size=64, target_mpp=1.0, min_tissue=0.25)
    h5 = tile_slide(slide, tmp_path / "h5", params, slide_id="s1", annotations=ann, progress=False)
    zr = tile_slide(
        slide, tmp_path / "zarr", TileParams(**{**params.__dict__, "format": "zarr"}),
        slide_id="s1", annotations=ann, progress=False,
    )  # fmt: skip
    with open_store(h5) as a, open_store(zr) as b:
        for key in REQUIRED_ATTRS:
            assert key in a.attrs and key in b.attrs
        assert a.attrs["slide_id"] == "s1" and a.attrs["patch_level"] == 1  # level 1 is 1.0 mpp
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.imgs[:], b.imgs[:])
        frac, labels = a.array("lesion_fraction"), a.array("labels")
        np.testing.assert_array_equal(frac, b.array("lesion_fraction"))
        assert frac.dtype == np.float32 and labels.tolist() == (frac >= 0.5).astype(int).tolist()
        expected = coverage_fraction(read_annotations(ann), a.coords, 128)
        np.testing.assert_allclose(frac, expected, atol=1e-6)
        assert 0 < labels.sum() < len(labels)  # lesions are a minority of the patches
        assert a.attrs["slide_id"] == "s1" and dict(a._h["coords"].attrs)["patch_size"] == 64  # CLAM


def test_coverage_fraction_exact() -> None:
    square = shapely.box(0, 0, 100, 100)
    got = coverage_fraction([square], np.array([[0, 0], [50, 50], [100, 0], [-25, 0]]), 50)
    np.testing.assert_allclose(got, [1.0, 1.0, 0.0, 0.5])


def test_workers_do_not_change_output(synth_slide: tuple[Path, Path], tmp_path: Path) -> None:
    slide, _ = synth_slide
    base = TileParams(patch_size=64, target_mpp=0.5, region_size=512)
    one = tile_slide(slide, tmp_path / "1", TileParams(**{**base.__dict__, "workers": 1}), progress=False)
    two = tile_slide(slide, tmp_path / "2", TileParams(**{**base.__dict__, "workers": 2}), progress=False)
    with open_store(one) as a, open_store(two) as b:
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.imgs[:], b.imgs[:])


def test_failure_mid_read_leaves_nothing(
    synth_slide: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_scaat.slides.openslide_backend import OpenSlideReader

    slide, _ = synth_slide
    calls = {"n": 0}
    original = OpenSlideReader._read

    def flaky(self, location, level, size):
        calls["n"] += 1
        if calls["n"] > 3:  # the thumbnail and the first regions succeed, then the codec fails
            raise RuntimeError("Bogus marker length")
        return original(self, location, level, size)

    monkeypatch.setattr(OpenSlideReader, "_read", flaky)
    out = tmp_path / "out"
    with pytest.raises(SlideReadError, match="Bogus marker length"):
        tile_slide(slide, out, TileParams(patch_size=64, region_size=256), progress=False)
    assert list(out.iterdir()) == []  # no store, no mask, no temporary leftovers


def test_missing_mpp_stops_tiling(tmp_path: Path) -> None:
    from wsi_scaat.errors import MppUnknownError

    from conftest import write_plain_tiff

    path = write_plain_tiff(tmp_path / "nompp.tiff", np.full((256, 256, 3), 200, np.uint8), mpp=None)
    with pytest.raises(MppUnknownError, match="mpp-override"):
        tile_slide(path, tmp_path / "out", TileParams(patch_size=64), progress=False)
    store = tile_slide(path, tmp_path / "out", TileParams(patch_size=64, min_tissue=0.0),
                       mpp_override=0.5, progress=False)  # fmt: skip
    with open_store(store) as s:
        assert s.attrs["mpp_source"] == "override" and len(s) == 16
