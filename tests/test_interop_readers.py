"""CLAM and TRIDENT read the field of view of every stored patch from a patch store's ``coords``.

Both tools are re-implemented here from their source, reading the HDF5 store and the slide
with OpenSlide exactly as they do:

- CLAM, commit 53e2409d4a8189c682c173382964a85f114f923c, ``dataset_modules/dataset_h5.py``
  (``Whole_Slide_Bag_FP``): ``patch_level`` and ``patch_size`` from ``f['coords'].attrs``, then
  ``wsi.read_region(coord, patch_level, (patch_size, patch_size)).convert('RGB')``; the encoder's
  transforms resize that to its input size.
- TRIDENT, commit a91fa8490e0210ebbbe58452c3babe009e0ab7ca: ``trident/IO.py`` (``read_coords``,
  ``read_coords_legacy``), ``trident/wsi_objects/WSI.py`` (``extract_patch_features``,
  ``get_best_level_and_custom_downsample``) and ``trident/wsi_objects/WSIPatcher.py``
  (``__init__``, ``from_legacy_coords``, ``_prepare``, ``get_tile_xy``). With
  ``level0_magnification`` and ``target_magnification`` in the attributes, pixel sizes are
  ``10 / magnification`` and ``patch_size`` counts pixels at the target magnification; without
  them TRIDENT warns and reads CLAM-style, ``patch_size`` pixels at ``patch_level`` times
  ``custom_downsample`` (default 1). Either way it reads ``round(patch_size_src / int(level
  downsample))`` pixels on the level chosen with tolerance 0.1 and resizes them to ``patch_size``.
  (At that commit ``extract_patch_features`` builds the CLAM-style patcher with
  ``coords_only=True``, so its feature extraction fails on a file without TRIDENT's attributes:
  the store writes them.)

A read "equals" the store when, resized to ``patch_size_out`` with the tiler's interpolation,
it is the stored patch; the attributes of version 1 stores (``patch_size`` = output size) would
read another field of view, which the tests also check they would notice.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest

from wsi_scaat.errors import StoreError
from wsi_scaat.slides.tiling import TileParams, tile_slide
from wsi_scaat.store import open_store


def clam_read(h5_path: Path, slide: openslide.OpenSlide, idx: int) -> np.ndarray:
    """``Whole_Slide_Bag_FP.__getitem__`` before its transforms (CLAM 53e2409)."""
    with h5py.File(h5_path, "r") as f:
        patch_level = f["coords"].attrs["patch_level"]
        patch_size = f["coords"].attrs["patch_size"]
        coord = f["coords"][idx]
    size = (int(patch_size), int(patch_size))
    img = slide.read_region((int(coord[0]), int(coord[1])), int(patch_level), size).convert("RGB")
    return np.asarray(img)


def _trident_best_level(downsamples: tuple[float, ...], downsample: float, tolerance: float) -> int:
    """``WSI.get_best_level_and_custom_downsample`` (level only)."""
    for level, ds in enumerate(downsamples):
        if abs(ds - downsample) <= tolerance:
            return level
    if downsample >= downsamples[0]:
        best = None
        for level, ds in enumerate(downsamples):
            if ds <= downsample:
                best = level
            else:
                break
        if best is not None:
            return best
    else:
        for level, ds in enumerate(downsamples):
            if ds >= downsample:
                return level
    raise ValueError(f"No suitable level found for downsample {downsample}.")


def trident_read(
    h5_path: Path, slide: openslide.OpenSlide, mpp: float, idx: int, *, legacy: bool = False
) -> tuple[np.ndarray, bool]:
    """TRIDENT's tile ``idx`` (``pil=False`` path) and whether it used its own attributes.

    ``legacy`` drops TRIDENT's attributes, as a CLAM file lacks them (TRIDENT's fallback).
    """
    with h5py.File(h5_path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    if legacy:
        attrs.pop("level0_magnification", None)
        attrs.pop("target_magnification", None)
    patch_size = attrs.get("patch_size")
    m0, mt = attrs.get("level0_magnification"), attrs.get("target_magnification")
    own = None not in (patch_size, m0, mt)
    if own:
        src_px, dst_px = 10 / m0, 10 / mt
    else:  # WSIPatcher.from_legacy_coords, with wsi.mpp known
        patch_size, patch_level = attrs["patch_size"], attrs["patch_level"]
        ratio = slide.level_downsamples[int(patch_level)] * attrs.get("custom_downsample", 1)
        src_px, dst_px = mpp, mpp * ratio
    downsample = dst_px / src_px
    patch_size_src = round(patch_size * downsample)
    level = _trident_best_level(slide.level_downsamples, downsample, tolerance=0.1)
    patch_size_level = round(patch_size_src / int(slide.level_downsamples[level]))
    x, y = (int(v) for v in coords[idx])
    size = (patch_size_level, patch_size_level)
    tile = np.asarray(slide.read_region((x, y), level, size).convert("RGB"))
    tile = cv2.resize(tile, (int(patch_size), int(patch_size)))[:, :, :3]
    return tile, own


def _as_stored(read: np.ndarray, side: int) -> np.ndarray:
    """A read resized to the stored side with the tiler's interpolation."""
    if read.shape[0] == side:
        return read
    interp = cv2.INTER_AREA if read.shape[0] > side else cv2.INTER_LINEAR
    return cv2.resize(read, (side, side), interpolation=interp)


def _old_clam_read(h5_path: Path, slide: openslide.OpenSlide, idx: int, side: int) -> np.ndarray:
    """CLAM's read under the version 1 attributes (``patch_size`` = output size)."""
    with h5py.File(h5_path, "r") as f:
        level, coord = int(f["coords"].attrs["patch_level"]), f["coords"][idx]
    return np.asarray(slide.read_region((int(coord[0]), int(coord[1])), level, (side, side)).convert("RGB"))


def _check_store(store_path: Path, slide_path: Path, level: int, crop: int, resampled: bool) -> None:
    with open_store(store_path) as store:
        a, imgs, n = store.attrs, store.imgs, len(store)
        side = store.patch_size
        assert (a["patch_level"], a["patch_size"], a["patch_size_out"]) == (level, crop, side)
        assert a["name"] == a["slide_id"] and n >= 4
        with openslide.OpenSlide(str(slide_path)) as slide:
            ds = slide.level_downsamples[level]
            assert a["patch_size_level0"] == round(crop * ds)  # the field of view, level 0
            assert a["level0_magnification"] / a["target_magnification"] == pytest.approx(ds)
            old_diffs = []
            for i in np.linspace(0, n - 1, 6).astype(int):
                stored = imgs[int(i)]
                clam = clam_read(store_path, slide, int(i))
                assert clam.shape == (crop, crop, 3)
                np.testing.assert_array_equal(_as_stored(clam, side), stored)
                for legacy in (False, True):
                    tile, own = trident_read(store_path, slide, a["mpp_level0"], int(i), legacy=legacy)
                    assert own is not legacy
                    np.testing.assert_array_equal(_as_stored(tile, side), stored)
                old = _old_clam_read(store_path, slide, int(i), side)
                old_diffs.append(np.abs(old.astype(int) - stored.astype(int)).mean())
        if resampled:  # version 1 attributes: another field of view, which these checks see
            assert min(old_diffs) > 5, old_diffs
        else:
            assert max(old_diffs) == 0


def test_single_level_slide_resampled_from_level0(cmu_slide: Path, tmp_path: Path) -> None:
    """CMU-1 (0.499 um/px, one level) at 1.0 um/px: 128-px patches cut from 256-px crops."""
    params = TileParams(patch_size=128, target_mpp=1.0)
    store = tile_slide(cmu_slide, tmp_path, params, progress=False)
    _check_store(store, cmu_slide, level=0, crop=round(128 * 1.0 / 0.499), resampled=True)


@pytest.mark.parametrize(
    ("target_mpp", "level", "crop", "resampled"),
    [
        (1.5, 1, 96, True),  # downsample 3: from level 1 (downsample 2), no level matches
        (0.75, 0, 96, True),  # downsample 1.5: from level 0
        (1.0, 1, 64, False),  # level 1 matches: no resampling
    ],
)
def test_pyramidal_slide(
    synth_slide: tuple[Path, Path], tmp_path: Path, target_mpp: float, level: int, crop: int, resampled: bool
) -> None:
    """The 0.5 um/px synthetic pyramid (downsamples 1, 2, 4, ...), 64-px patches."""
    slide, _ = synth_slide
    params = TileParams(patch_size=64, target_mpp=target_mpp, min_tissue=0.5)
    store = tile_slide(slide, tmp_path, params, slide_id="s", progress=False)
    _check_store(store, slide, level=level, crop=crop, resampled=resampled)


def test_version1_store_stays_readable(synth_slide: tuple[Path, Path], tmp_path: Path) -> None:
    """A store written before ``patch_size_out`` reads with its ``patch_size`` as the output size."""
    slide, _ = synth_slide
    params = TileParams(patch_size=64, target_mpp=1.5)
    store = tile_slide(slide, tmp_path, params, slide_id="s", progress=False)
    with h5py.File(store, "r+") as f:
        for node in (f, f["coords"]):
            node.attrs["patch_size"], node.attrs["store_version"] = 64, 1
            del node.attrs["patch_size_out"]
    with open_store(store) as s:
        assert s.patch_size == 64 and s.attrs["patch_size_out"] == 64
    with h5py.File(store, "r+") as f:
        f.attrs["store_version"] = 2
    with pytest.raises(StoreError, match="store version 2 without attribute patch_size_out"):
        open_store(store)
    with h5py.File(store, "r+") as f:  # the failed open closed the file: it opens for writing
        f.attrs["store_version"] = 3
    with pytest.raises(StoreError, match="store version 3 is newer than this wsi-scaat reads"):
        open_store(store)
