"""The patch grid at a target mpp, and the tiling stage that fills a patch store.

The grid is laid out on the pyramid level read (the deepest level not coarser than the target);
when that level's mpp is within ``snap_tolerance`` of the target, patches are cut at that level
without resampling, otherwise each patch is resized from a slightly larger crop. Regions of many
patches are read at once (not one ``read_region`` per patch), by one thread per core, each with
its own slide handle; patches are encoded in the same threads.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from wsi_scaat import __version__
from wsi_scaat.annotations import coverage_fraction, read_annotations
from wsi_scaat.atomic import atomic_output
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.manifest import check_slide_id
from wsi_scaat.sections import TilingConfig, TissueConfig
from wsi_scaat.sections import field_default as _d
from wsi_scaat.slides.reader import SlideInfo, SlideReader, open_slide
from wsi_scaat.slides.tissue import (
    TissueMask,
    detect_slide_tissue,
    no_tissue_message,
    save_tissue_png,
    tissue_geojson,
    tissue_settings,
)
from wsi_scaat.store import STORE_VERSION, create_store, store_suffix

#: Extensions of more than one part, stripped whole from slide names (as QuPath's ``GeneralTools``).
MULTIPART_EXTENSIONS = (".ome.tif", ".ome.tiff", ".ome.zarr")


@dataclass(frozen=True)
class PatchGrid:
    """Patch positions on the level read; ``coords`` are top-left (x, y) in level-0 pixels."""

    coords: np.ndarray  # (N, 2) int64, level 0
    level_xy: np.ndarray  # (N, 2) int64, top-left on the level read
    patch_size: int  # output pixels
    crop_size: int  # pixels cut on the level read (== patch_size unless resampling)
    level: int
    level_downsample: float
    downsample: float  # level-0 pixels per output pixel
    patch_size_level0: int
    step_level0: int

    @property
    def resample(self) -> bool:
        return self.crop_size != self.patch_size

    def subset(self, keep: np.ndarray) -> PatchGrid:
        """The grid restricted to the patches where ``keep`` is true."""
        return PatchGrid(**{**self.__dict__, "coords": self.coords[keep], "level_xy": self.level_xy[keep]})


def plan_grid(
    info: SlideInfo,
    patch_size: int,
    target_mpp: float,
    overlap: int = 0,
    snap_tolerance: float = 0.02,
) -> PatchGrid:
    """Every patch position of a slide, row-major (y, then x), patches wholly inside the slide."""
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be in [0, patch_size), got {overlap}")
    mpp0 = info.require_mpp()
    downsample = target_mpp / mpp0
    level = info.best_level_for_downsample(downsample, tolerance=snap_tolerance)
    level_ds = info.level_downsamples[level]
    ratio = downsample / level_ds  # level pixels per output pixel
    if abs(ratio - 1.0) <= snap_tolerance:
        ratio, downsample = 1.0, level_ds
    crop = int(round(patch_size * ratio))
    if crop < 1:  # e.g. a bogus resolution tag (72 dpi read as the scan's resolution)
        raise WsiScaatError(
            info.path,
            f"level-0 mpp {mpp0:g} is so coarse that a {patch_size}-px patch at {target_mpp:g} mpp "
            "would come from less than one pixel; check the slide's mpp (or give --mpp-override)",
        )
    step = (patch_size - overlap) * ratio
    lw, lh = info.level_dimensions[level]
    nx = int((lw - crop) // step) + 1 if lw >= crop else 0
    ny = int((lh - crop) // step) + 1 if lh >= crop else 0
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    level_xy = np.stack([np.round(gx.ravel() * step), np.round(gy.ravel() * step)], 1).astype(np.int64)
    coords = np.round(level_xy * level_ds).astype(np.int64)
    return PatchGrid(
        coords=coords, level_xy=level_xy, patch_size=patch_size, crop_size=crop, level=level,
        level_downsample=level_ds, downsample=float(downsample),
        patch_size_level0=int(round(crop * level_ds)),  # the field of view of the crop
        step_level0=int(round((patch_size - overlap) * downsample)),
    )  # fmt: skip


def group_regions(grid: PatchGrid, region_side: int) -> list[np.ndarray]:
    """Patch indices grouped into regions of about ``region_side`` level pixels per side."""
    if not len(grid.coords):
        return []
    cell = np.maximum(grid.level_xy // max(region_side, grid.crop_size), 0)
    order = np.lexsort((cell[:, 0], cell[:, 1]))
    keys = cell[order]
    breaks = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    return np.split(order, breaks)


def cut_patches(
    region: np.ndarray, origin: np.ndarray, grid: PatchGrid, idx: np.ndarray
) -> Iterator[np.ndarray]:
    """Patches ``idx`` cut from ``region`` (read on the grid's level with top-left ``origin``)."""
    c, p = grid.crop_size, grid.patch_size
    interp = cv2.INTER_AREA if c > p else cv2.INTER_LINEAR
    for i in idx:
        x, y = grid.level_xy[i] - origin
        patch = region[y : y + c, x : x + c]
        yield cv2.resize(patch, (p, p), interpolation=interp) if grid.resample else patch


class _ThreadReaders:
    """One slide handle per worker thread, closed together."""

    def __init__(self, path: str, mpp_override: float | None) -> None:
        self._path, self._mpp, self._local, self._all = path, mpp_override, threading.local(), []
        self._lock = threading.Lock()

    def get(self) -> SlideReader:
        if not hasattr(self._local, "reader"):
            self._local.reader = open_slide(self._path, self._mpp)
            with self._lock:
                self._all.append(self._local.reader)
        return self._local.reader

    def close(self) -> None:
        for reader in self._all:
            reader.close()


def _read_and_encode(
    readers: _ThreadReaders, grid: PatchGrid, idx: np.ndarray, encode
) -> list[tuple[int, bytes]]:
    xy = grid.level_xy[idx]
    origin = xy.min(axis=0)
    size = xy.max(axis=0) + grid.crop_size - origin
    location = np.round(origin * grid.level_downsample).astype(int)
    region = readers.get().read_region(tuple(location), grid.level, tuple(size))
    return [(int(i), encode(p)) for i, p in zip(idx, cut_patches(region, origin, grid, idx), strict=True)]


@dataclass(frozen=True)
class TileParams:
    """Parameters of the tiling stage; defaults from the config sections ``tiling`` and ``tissue``."""

    patch_size: int = _d(TilingConfig, "patch_size")
    target_mpp: float = _d(TilingConfig, "target_mpp")
    overlap: int = _d(TilingConfig, "overlap")
    min_tissue: float = _d(TilingConfig, "min_tissue")
    format: str = _d(TilingConfig, "format")
    compression: str = _d(TilingConfig, "compression")
    thumbnail_mpp: float = _d(TissueConfig, "thumbnail_mpp")
    region_size: int = _d(TilingConfig, "region_size")
    label_threshold: float = _d(TilingConfig, "label_threshold")
    annotation_class: str = _d(TilingConfig, "annotation_class")
    workers: int = 0  # 0: one per available core
    tissue: TissueConfig = field(default_factory=TissueConfig)  # its thumbnail_mpp: see thumbnail_mpp


def available_cores() -> int:
    """Cores this process may use (respects affinity and cgroup-limited CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_slide_id(slide: str | Path) -> str:
    """The file name without its extension, as QuPath names images: ``x.ome.tif`` -> ``x``."""
    name = Path(slide).name
    for ext in MULTIPART_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return Path(name).stem


def tile_slide(
    slide: str | Path,
    out_dir: str | Path,
    params: TileParams = TileParams(),
    *,
    slide_id: str | None = None,
    annotations: str | Path | None = None,
    mpp_override: float | None = None,
    progress: bool = True,
) -> Path:
    """Tile one slide: tissue mask, patch grid, patch store. Returns the store's path.

    Writes ``<slide_id>.{h5|zarr}``, ``<slide_id>.tissue.png`` and ``<slide_id>.tissue.geojson``
    under ``out_dir``; all three appear only if the whole slide was read successfully.
    """
    slide = Path(slide)
    slide_id = check_slide_id(slide_id or default_slide_id(slide))  # it names the outputs: never a path
    out_dir = Path(out_dir)
    store_path = out_dir / f"{slide_id}{store_suffix(params.format)}"
    with open_slide(slide, mpp_override) as reader:
        info = reader.info
        tissue, _ = detect_slide_tissue(reader, params.thumbnail_mpp, **tissue_settings(params.tissue))
    grid = plan_grid(info, params.patch_size, params.target_mpp, params.overlap)
    patch = f"{params.patch_size}-px patch at {params.target_mpp:g} mpp"
    if not len(grid.coords):
        size = f"{info.width} x {info.height} px"
        raise WsiScaatError(slide, f"no patches: the slide ({size}) is smaller than one {patch}")
    if not tissue.mask.any() and params.min_tissue > 0:  # min_tissue 0 asks for every patch
        raise WsiScaatError(slide, no_tissue_message(params.tissue, params.thumbnail_mpp))
    fraction = tissue.fraction_in(grid.coords[:, 0], grid.coords[:, 1], grid.patch_size_level0)
    n_grid, grid = len(grid.coords), grid.subset(fraction >= params.min_tissue)
    if not len(grid.coords):
        floor = f"tissue fraction >= {params.min_tissue:g}"
        raise WsiScaatError(slide, f"no patches: none of the {n_grid} patches has {floor} ({patch})")
    attrs = _store_attrs(info, grid, params, slide_id, tissue)
    polygons = read_annotations(annotations, params.annotation_class) if annotations else None

    with (
        atomic_output(out_dir / f"{slide_id}.tissue.png") as png_tmp,
        atomic_output(out_dir / f"{slide_id}.tissue.geojson") as geo_tmp,
        create_store(store_path, len(grid.coords), params.patch_size, params.compression) as store,
    ):
        save_tissue_png(tissue, png_tmp, slide_id)
        geo_tmp.write_text(tissue_geojson(tissue, slide_id), encoding="utf-8")
        store.write_array("coords", grid.coords)
        store.write_array("tissue_mask", tissue.mask.astype(np.uint8))
        if polygons is not None:
            lesion = coverage_fraction(polygons, grid.coords, grid.patch_size_level0)
            store.write_array("lesion_fraction", lesion.astype(np.float32))
            store.write_array("labels", (lesion >= params.label_threshold).astype(np.int64))
        store.set_attrs(attrs)
        _fill_store(store, str(slide), mpp_override, grid, params, progress, slide_id)
    return store_path


def _fill_store(
    store,
    slide: str,
    mpp_override,
    grid: PatchGrid,
    params: TileParams,
    progress: bool,
    slide_id: str,
) -> None:
    workers = params.workers or available_cores()
    regions = group_regions(grid, params.region_size)
    readers = _ThreadReaders(slide, mpp_override)
    bar = tqdm(
        total=len(grid.coords),
        desc=f"tile {slide_id}",
        unit="patch",
        disable=not progress,
        mininterval=1.0,
    )
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for idx in regions:
            pending.append(pool.submit(_read_and_encode, readers, grid, idx, store.encode))
            if len(pending) >= 2 * workers:  # bound the patches held in memory
                _drain(pending.popleft(), store, bar)
        while pending:
            _drain(pending.popleft(), store, bar)
    finally:
        # On a read error, regions not yet started are dropped; running ones finish before the
        # handles close.
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        readers.close()


def _drain(fut: Future, store, bar: tqdm) -> None:
    chunks = fut.result()
    for i, chunk in chunks:
        store.write_chunk(i, chunk)
    bar.update(len(chunks))


def _store_attrs(
    info: SlideInfo, grid: PatchGrid, params: TileParams, slide_id: str, tissue: TissueMask
) -> dict:
    mpp0 = info.require_mpp()
    return {
        # CLAM and TRIDENT read each patch as read_region(coord, patch_level, (patch_size,) * 2):
        # patch_size counts pixels of the level read; the side of `imgs` is patch_size_out.
        "patch_size": grid.crop_size,
        "patch_size_out": params.patch_size,
        "patch_level": grid.level,
        "name": slide_id,  # CLAM and TRIDENT name the slide with it
        # TRIDENT's own format: magnification = 10 / mpp; patch_size counts pixels at the
        # target magnification, hence that of the level read.
        "level0_magnification": 10.0 / mpp0,
        "target_magnification": 10.0 / (mpp0 * grid.level_downsample),
        "downsample": grid.downsample,
        "level_downsample": grid.level_downsample,
        "patch_size_level0": grid.patch_size_level0,
        "step_level0": grid.step_level0,
        "mpp_level0": mpp0,
        "mpp_source": info.mpp_source,
        "patch_mpp": mpp0 * grid.downsample,
        "target_mpp": params.target_mpp,
        "overlap": params.overlap,
        "min_tissue": params.min_tissue,
        "label_threshold": params.label_threshold,
        "slide_width": info.width,
        "slide_height": info.height,
        "level_dim": list(info.level_dimensions[grid.level]),
        "slide_id": slide_id,
        "source_path": str(Path(info.path).resolve()),
        "reader_backend": info.backend,
        "tissue_downsample": tissue.downsample,
        "tissue_settings": json.dumps(tissue_settings(params.tissue), sort_keys=True),
        "compression": params.compression,
        "store_version": STORE_VERSION,
        "wsi_scaat_version": __version__,
    }
