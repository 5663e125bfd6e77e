"""Out-of-core stitching of patch saliency maps into a slide-level heatmap pyramid (``.heatmap.zarr``).

Geometry (see the contract in :mod:`wsi_scaat.heatmaps`): heatmap pixels are map pixels,
``hd = patch_size_level0 / map_size`` level-0 px wide; level 0 is ``ceil(slide / hd)``; a patch at
level-0 ``(x, y)`` lands at heatmap column ``round(x / hd)`` (half to even) and row ``round(y / hd)``;
parts beyond the slide are dropped.

Value (``stitch.value``, :mod:`wsi_scaat.heatmaps.values`): each patch contributes per-pixel values
``m_i``: its saliency map, the positive part of its signed map (``evidence``), its saliency map times
its probability of the target class (``weighted``) or that probability alone (``probability``).
The patches are the store's and, when the saliency stage ran with an overlap, those of its
``overlap`` group (read after the store's own).

Blending: ``value = sum_i w * m_i / sum_i w`` over the patches covering a pixel, accumulated in
float64 in store (patch index) order and rounded once to float32, so a constant, or any set of
equal values, stitches to exactly that value. ``w`` is :func:`blend_window`. Non-finite map values
are read as 0 (NaN) or the float16 maximum (inf). Pixels covered by no patch are 0.

Normalisation (per slide; not for ``probability``, already in [0, 1]): ``v_lo, v_hi`` are the
``low_percentile`` / ``high_percentile`` (numpy linear interpolation, finite values only) of the
raw patch values of the saliency factor (the maps; for ``evidence`` their positive part) of the
store's own patches, taken over a
deterministic subsample: every k-th patch, starting at patch k // 2, with
``k = ceil(N * map_size**2 / PERCENTILE_SAMPLE_VALUES)`` (all patches when they hold at most
``PERCENTILE_SAMPLE_VALUES`` ~ 4.2 M values), read in batches grouped by store chunk. The stored
value is ``clip((v - v_lo) / (v_hi - v_lo), 0, 1)`` of the float32 blend ``v``; when
``v_hi == v_lo`` it is 1 where ``v > v_lo`` and 0 elsewhere. Both go to ``attrs["normalization"]``.

Tissue: with ``mask_tissue``, a pixel whose centre falls on a tissue-mask pixel of value 0 (the mask
pixel containing the centre, clamped to the mask) is set to 0.

Out of core: level 0 is a dask array of ``(chunk, chunk)`` blocks. The driver maps each block to the
sorted indices of the patches touching it (vectorised over the coords) and hands each task only
those indices, their positions and its piece of the tissue mask. A task opens the saliency store by
path and reads only the store chunks holding its patches: the chunks missing from the process's LRU
cache of decoded chunks (128 MB; neighbouring blocks share chunks, and blocks run in row-major order)
in one call, as one slice of the index range when at least half of it is used, else as a zarr
orthogonal selection. It blends into chunk-sized float64 buffers, normalises, masks, and its chunk is
written. Levels 1.. are then read back lazily, coarsened 2x2 and written
(:mod:`wsi_scaat.heatmaps.pyramid`). Memory: a few chunk-sized buffers per thread, the cache, the
coords; the full canvas is never held.
"""

from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from wsi_scaat.atomic import atomic_output
from wsi_scaat.errors import StoreError
from wsi_scaat.heatmaps import pyramid, values
from wsi_scaat.heatmaps.pyramid import read_patches, read_patches_cached
from wsi_scaat.saliency.store import OVERLAP_GROUP, signed_maps, target_probability
from wsi_scaat.sections import StitchConfig
from wsi_scaat.sections import field_default as _d

HEATMAP_VERSION = 2
SUFFIX = ".heatmap.zarr"
WINDOWS = ("hann", "flat")
PERCENTILE_SAMPLE_VALUES = 1 << 22  # at most this many map values (plus one patch) for the percentiles
READ_BATCH = 1024  # patches per read when sampling


def blend_window(size: int, kind: str) -> np.ndarray:
    """(size, size) float32 blending weights, strictly positive: "hann" (a Hann window of size + 2
    without its zero ends, outer product) or "flat" (ones)."""
    if kind not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, not {kind!r}")
    if kind == "flat":
        return np.ones((size, size), dtype=np.float32)
    k = np.arange(1, size + 1, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * k / (size + 1))
    return np.outer(w, w).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _window64(size: int, kind: str) -> np.ndarray:
    return blend_window(size, kind).astype(np.float64)


@dataclass(frozen=True)
class Tissue:
    """The part of the tissue mask a block needs: ``mask[row0:, col0:]`` of a mask of ``shape``."""

    sub: np.ndarray
    row0: int
    col0: int
    shape: tuple[int, int]
    downsample: float


def _mask_index(start: int, stop: int, hd: float, td: float, n: int) -> np.ndarray:
    """Tissue-mask row (or column) holding the centre of heatmap rows ``start .. stop - 1``."""
    centre = (np.arange(start, stop, dtype=np.float64) + 0.5) * hd
    return np.clip(np.floor(centre / td).astype(np.int64), 0, n - 1)


def _tissue_for(mask: np.ndarray, td: float, hd: float, box: tuple[int, int, int, int]) -> Tissue:
    r0, r1, c0, c1 = box
    mr, mc = _mask_index(r0, r1, hd, td, mask.shape[0]), _mask_index(c0, c1, hd, td, mask.shape[1])
    sub = np.ascontiguousarray(mask[mr[0] : mr[-1] + 1, mc[0] : mc[-1] + 1])
    return Tissue(sub, int(mr[0]), int(mc[0]), (int(mask.shape[0]), int(mask.shape[1])), td)


def _tissue_pixels(t: Tissue, hd: float, box: tuple[int, int, int, int]) -> np.ndarray:
    r0, r1, c0, c1 = box
    mr = _mask_index(r0, r1, hd, t.downsample, t.shape[0]) - t.row0
    mc = _mask_index(c0, c1, hd, t.downsample, t.shape[1]) - t.col0
    return t.sub[np.ix_(mr, mc)] != 0


def tissue_pixels(mask: np.ndarray, td: float, hd: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Bool tissue mask of heatmap pixels ``box = (r0, r1, c0, c1)`` (pixel side ``hd``) from a tissue
    mask of downsample ``td``: the mask pixel holding each heatmap pixel's centre, as stitching uses."""
    return _tissue_pixels(_tissue_for(mask, td, hd, box), hd, box)


def sample_indices(n: int, map_size: int, budget: int = PERCENTILE_SAMPLE_VALUES) -> np.ndarray:
    """The patches whose values feed the percentiles: every k-th from k // 2 (all when they fit)."""
    k = max(1, math.ceil(n * map_size * map_size / max(1, budget)))
    return np.arange(k // 2, n, k, dtype=np.int64)


def percentile_range(
    maps: zarr.Array, low: float, high: float, value: str = "saliency"
) -> tuple[float, float]:
    """(v_lo, v_hi): percentiles of the finite values of the subsampled maps (their saliency factor for
    ``value``: the positive part for ``evidence``); (0, 0) when none."""
    idx = sample_indices(maps.shape[0], maps.shape[1])
    parts = []
    for s in range(0, len(idx), READ_BATCH):
        v = values.factor(value, read_patches(maps, idx[s : s + READ_BATCH])).ravel()
        parts.append(v[np.isfinite(v)])
    sample = np.concatenate(parts) if parts else np.zeros(0, np.float16)
    if sample.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(sample.astype(np.float64), [low, high])
    return float(lo), float(hi)


def _accumulate(num: np.ndarray, den: np.ndarray, pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                r0: int, c0: int, window: np.ndarray) -> None:  # fmt: skip
    """Add ``w * m`` and ``w`` of each patch's float64 values (in the given order) into the buffers at
    (r0, c0); ``pixels`` is overwritten."""
    m = window.shape[0]
    h, w = num.shape
    weighted = pixels
    weighted *= window
    for k in range(len(rows)):
        pr, pc = int(rows[k]) - r0, int(cols[k]) - c0
        a0, a1, b0, b1 = max(pr, 0), min(pr + m, h), max(pc, 0), min(pc + m, w)
        if a0 >= a1 or b0 >= b1:
            continue
        num[a0:a1, b0:b1] += weighted[k, a0 - pr : a1 - pr, b0 - pc : b1 - pc]
        den[a0:a1, b0:b1] += window[a0 - pr : a1 - pr, b0 - pc : b1 - pc]


def _finish(num: np.ndarray, den: np.ndarray, norm: tuple[float, float] | None,
            tissue: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """Blend (num / den, float32), normalise, zero uncovered and non-tissue pixels."""
    covered = den > 0
    raw = np.divide(num, den, out=np.zeros_like(num), where=covered).astype(np.float32)
    if norm is not None:
        lo, hi = norm
        if hi > lo:
            raw = np.clip((raw.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        else:
            raw = (raw > lo).astype(np.float32)
        raw[~covered] = 0.0
    if tissue is not None:
        raw[~tissue] = 0.0
    return raw


@dataclass(frozen=True)
class Part:
    """The patches of one block from one set (the store's own or its overlap group)."""

    array: str | None  # path of the zarr array read (None for ``probability``)
    idx: np.ndarray  # sorted indices in that set
    rows: np.ndarray
    cols: np.ndarray
    prob: np.ndarray | None  # probability of the target class, when the value needs it


def render_block(parts: list[Part], box: tuple[int, int, int, int], map_size: int, window: str,
                 norm: tuple[float, float] | None, tissue: Tissue | None, hd: float, value: str = "saliency",
                 token: str | None = None) -> np.ndarray:  # fmt: skip
    """One heatmap block ``[r0:r1, c0:c1]`` from the patches of ``parts`` (in order); with a ``token``,
    maps are read through the process's chunk cache."""
    r0, r1, c0, c1 = box
    if not any(len(p.idx) for p in parts):
        return np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
    num = np.zeros((r1 - r0, c1 - c0), dtype=np.float64)
    den = np.zeros_like(num)
    win = _window64(map_size, window)
    for k, p in enumerate(parts):
        if not len(p.idx):
            continue
        raw = None
        if p.array is not None:
            arr = zarr.open_array(p.array, mode="r")
            cached = token is not None
            raw = read_patches_cached(arr, p.idx, f"{token}/{k}") if cached else read_patches(arr, p.idx)
        _accumulate(num, den, values.pixel_values(value, raw, p.prob, map_size), p.rows, p.cols, r0, c0, win)
    mask = None if tissue is None else _tissue_pixels(tissue, hd, box)
    return _finish(num, den, norm, mask)


@dataclass
class Source:
    """One set of patches: the store's own (``offset`` 0) or its overlap group (``offset`` N)."""

    array: zarr.Array | None
    prob: np.ndarray | None
    offset: int
    n: int


@dataclass
class Plan:
    """Everything the driver knows about a slide before any map is read."""

    path: Path
    attrs: dict[str, Any]
    hd: float
    shape: tuple[int, int]
    map_size: int
    rows: np.ndarray  # heatmap row of each patch's top-left, the store's patches then the overlap's
    cols: np.ndarray
    maps: zarr.Array  # the store's own ``maps``
    tissue_mask: np.ndarray | None
    tissue_downsample: float
    value: str = "saliency"
    sources: list[Source] | None = None

    def parts(self, idx: np.ndarray) -> list[Part]:
        """``idx`` (sorted, over all patches) split by source, with positions and probabilities."""
        out = []
        for src in self.sources or []:
            sel = idx[(idx >= src.offset) & (idx < src.offset + src.n)]
            local = sel - src.offset
            path = None if src.array is None else str(self.path / src.array.path)
            prob = None if src.prob is None else src.prob[local]
            out.append(Part(path, local, self.rows[sel], self.cols[sel], prob))
        return out


def _source(group: zarr.Group, path: Path, value: str, offset: int, n: int, map_size: int) -> Source:
    name = values.source_array(value)
    arr = None
    if name == "signed":
        arr = signed_maps(group, path)
    elif name is not None:
        arr = group[name]
    if arr is not None and arr.shape != (n, map_size, map_size):
        raise StoreError(path, f"{name} {arr.shape} do not match {n} patches of {map_size} px")
    prob = target_probability(group) if values.uses_probability(value) else None
    return Source(arr, prob, offset, n)


def open_plan(saliency_store: str | Path, mask_tissue: bool, value: str = "saliency") -> Plan:
    """Read the store's attributes, coords, probabilities and (small) tissue mask; the heatmap geometry."""
    values.check_value(value)
    path = Path(saliency_store).absolute()  # tasks may run on workers with another working folder
    if not path.exists():
        raise StoreError(path, "saliency store not found")
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
        coords = np.asarray(root["coords"][...], dtype=np.int64).reshape(-1, 2)
        maps = root["maps"]
        map_size = int(attrs["map_size"])
        hd = float(attrs["patch_size_level0"]) / map_size
        shape = (math.ceil(int(attrs["slide_height"]) / hd), math.ceil(int(attrs["slide_width"]) / hd))
        mask, td = None, 1.0
        if mask_tissue and "tissue_mask" in root:
            mask = np.asarray(root["tissue_mask"][...])
            td = float(attrs["tissue_downsample"])
        groups = [(root, len(coords))]
        if OVERLAP_GROUP in root:
            extra = np.asarray(root[OVERLAP_GROUP]["coords"][...], dtype=np.int64).reshape(-1, 2)
            groups.append((root[OVERLAP_GROUP], len(extra)))
            coords = np.concatenate([coords, extra])
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise StoreError(path, f"not a usable saliency store: {exc!r}") from exc
    if maps.shape != (groups[0][1], map_size, map_size):
        raise StoreError(path, f"maps {maps.shape} do not match {groups[0][1]} patches of {map_size} px")
    sources, offset = [], 0
    for group, n in groups:
        sources.append(_source(group, path, value, offset, n, map_size))
        offset += n
    rows = np.rint(coords[:, 1] / hd).astype(np.int64)
    cols = np.rint(coords[:, 0] / hd).astype(np.int64)
    return Plan(path, attrs, hd, shape, map_size, rows, cols, maps, mask, td, value, sources)


def slide_range(plan: Plan, low: float, high: float, normalize: bool = True) -> tuple[float, float] | None:
    """(v_lo, v_hi) of the plan's value, or None when it is not normalised."""
    if not normalize or not values.normalised(plan.value):
        return None
    return percentile_range(plan.sources[0].array, low, high, plan.value)


def block_patches(rows: np.ndarray, cols: np.ndarray, m: int, shape: tuple[int, int],
                  chunk: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Patch indices per block (row-major over blocks): ``(indices, bounds)``, block b's sorted indices
    being ``indices[bounds[b]:bounds[b + 1]]``."""
    (h, w), nbx = shape, -(-shape[1] // chunk)
    nblocks = -(-h // chunk) * nbx
    r0, r1 = np.clip(rows, 0, h), np.clip(rows + m, 0, h)
    c0, c1 = np.clip(cols, 0, w), np.clip(cols + m, 0, w)
    inside = np.flatnonzero((r1 > r0) & (c1 > c0))
    br0, bc0 = r0[inside] // chunk, c0[inside] // chunk
    nbr, nbc = (r1[inside] - 1) // chunk - br0 + 1, (c1[inside] - 1) // chunk - bc0 + 1
    count = nbr * nbc
    owner = np.repeat(np.arange(len(inside)), count)
    k = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    block = (br0[owner] + k // nbc[owner]) * nbx + bc0[owner] + k % nbc[owner]
    patch = inside[owner]
    order = np.lexsort((patch, block))
    bounds = np.searchsorted(block[order], np.arange(nblocks + 1))
    return patch[order], bounds


def _check(window: str, low: float, high: float, chunk: int) -> None:
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, not {window!r}")
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low_percentile < high_percentile <= 100, got {low}, {high}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")


def heatmap_level0(saliency_store: str | Path, *, chunk: int = 1024, window: str = "hann",
                   low_percentile: float = 1.0, high_percentile: float = 99.0, mask_tissue: bool = True,
                   normalize: bool = True, token: str | None = None, value: str = _d(StitchConfig, "value"),
                   ) -> tuple[da.Array, Plan, tuple[float, float] | None]:  # fmt: skip
    """Lazy level 0 (float32 dask array of (chunk, chunk) blocks), the plan and (v_lo, v_hi).

    Block tasks are named in row-major order, so that dask runs neighbours together; with a ``token``
    they share decoded store chunks through ``pyramid.CACHE`` (``pyramid.CACHE.drop(token)`` when done)."""
    _check(window, low_percentile, high_percentile, chunk)
    plan = open_plan(saliency_store, mask_tissue, value)
    norm = slide_range(plan, low_percentile, high_percentile, normalize)
    indices, bounds = block_patches(plan.rows, plan.cols, plan.map_size, plan.shape, chunk)
    h, w = plan.shape
    render = dask.delayed(render_block)
    name = f"heatmap-block-{token or uuid.uuid4().hex}"
    grid = []
    for bi, r0 in enumerate(range(0, h, chunk)):
        line = []
        for bj, c0 in enumerate(range(0, w, chunk)):
            b = bi * (-(-w // chunk)) + bj
            idx = indices[bounds[b] : bounds[b + 1]]
            box = (r0, min(r0 + chunk, h), c0, min(c0 + chunk, w))
            tissue = None
            if plan.tissue_mask is not None:
                tissue = _tissue_for(plan.tissue_mask, plan.tissue_downsample, plan.hd, box)
            task = render(plan.parts(idx), box, plan.map_size, window, norm, tissue, plan.hd, plan.value,
                          token, dask_key_name=f"{name}-{bi:06d}-{bj:06d}")  # fmt: skip
            line.append(da.from_delayed(task, (box[1] - r0, box[3] - c0), dtype=np.float32))
        grid.append(line)
    level0 = da.block(grid) if grid and grid[0] else da.zeros((h, w), dtype=np.float32, chunks=chunk)
    return level0, plan, norm


def _attrs(plan: Plan, norm: tuple[float, float] | None, low: float, high: float, window: str,
           n_levels: int, chunk: int) -> dict[str, Any]:  # fmt: skip
    normalization: dict[str, Any] = {"method": "none"}
    if norm is None and not values.normalised(plan.value):
        normalization = {"method": "none", "reason": f"{plan.value} values are in [0, 1]"}
    if norm is not None:
        normalization = {"method": "percentile", "low_percentile": float(low),
                         "high_percentile": float(high), "low": norm[0], "high": norm[1]}  # fmt: skip
    pixel_um = float(plan.attrs.get("mpp_level0", float("nan"))) * plan.hd
    name = str(plan.attrs.get("slide_id", plan.path.name))
    return plan.attrs | {
        "heatmap_downsample": plan.hd,
        "value": plan.value,
        "meaning": values.meaning(plan.value, str(plan.attrs.get("saliency_target", "predicted"))),
        "n_overlap": int(sum(s.n for s in plan.sources[1:])) if plan.sources else 0,
        "level_downsamples": [2**k for k in range(n_levels)],
        "normalization": normalization,
        "window": window,
        "tissue_masked": plan.tissue_mask is not None,
        "chunk": int(chunk),
        "heatmap_version": HEATMAP_VERSION,
        "multiscales": pyramid.multiscales(n_levels, pixel_um, name),
    }


def stitch(saliency_store: str | Path, out: str | Path, *, chunk: int = _d(StitchConfig, "chunk"),
           window: str = _d(StitchConfig, "window"),
           low_percentile: float = _d(StitchConfig, "low_percentile"),
           high_percentile: float = _d(StitchConfig, "high_percentile"),
           mask_tissue: bool = _d(StitchConfig, "mask_tissue"), scheduler: str | None = None,
           progress: bool = False, normalize: bool = True,
           value: str = _d(StitchConfig, "value")) -> Path:  # fmt: skip
    """Build the ``.heatmap.zarr`` pyramid ``out`` atomically (temporary sibling, renamed when complete).

    ``scheduler``: None for dask's local threads (one per available core), "threads" / "synchronous"
    / "processes", or a ``dask.distributed`` scheduler address. ``normalize=False`` keeps the raw
    blend (for checks; the contract's outputs are normalised). ``value``: what a pixel means
    (:mod:`wsi_scaat.heatmaps.values`). Returns ``out``.
    """
    out, token = Path(out), uuid.uuid4().hex
    level0, plan, norm = heatmap_level0(saliency_store, chunk=chunk, window=window, token=token,
                                        low_percentile=low_percentile, high_percentile=high_percentile,
                                        mask_tissue=mask_tissue, normalize=normalize,
                                        value=value)  # fmt: skip
    shapes = pyramid.level_shapes(*plan.shape)
    with atomic_output(out.absolute()) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        pyramid.create_levels(root, shapes, chunk)
        root.attrs.update(_attrs(plan, norm, low_percentile, high_percentile, window, len(shapes), chunk))
        try:
            pyramid.compute([pyramid.store_lazily(level0, tmp / "0")], scheduler, progress)
        finally:
            pyramid.CACHE.drop(token)
        pyramid.build_levels(tmp, shapes, chunk, scheduler, progress)
    return out


def stitch_dense(saliency_store: str | Path, *, window: str = "hann", low_percentile: float = 1.0,
                 high_percentile: float = 99.0, mask_tissue: bool = True, normalize: bool = True,
                 batch: int = 4096, value: str = _d(StitchConfig, "value")) -> np.ndarray:  # fmt: skip
    """Reference: heatmap level 0 as one dense numpy canvas (same blending, normalisation, masking)."""
    _check(window, low_percentile, high_percentile, 1)
    plan = open_plan(saliency_store, mask_tissue, value)
    norm = slide_range(plan, low_percentile, high_percentile, normalize)
    num = np.zeros(plan.shape, dtype=np.float64)
    den = np.zeros_like(num)
    win = _window64(plan.map_size, window)
    for src in plan.sources:
        for s in range(0, src.n, batch):
            raw = None if src.array is None else np.asarray(src.array[s : s + batch])
            prob = None if src.prob is None else src.prob[s : s + batch]
            n = min(batch, src.n - s)
            pix = values.pixel_values(value, raw, prob, plan.map_size)
            sel = slice(src.offset + s, src.offset + s + n)
            _accumulate(num, den, pix, plan.rows[sel], plan.cols[sel], 0, 0, win)
    box = (0, plan.shape[0], 0, plan.shape[1])
    mask = None
    if plan.tissue_mask is not None and num.size:
        tissue = _tissue_for(plan.tissue_mask, plan.tissue_downsample, plan.hd, box)
        mask = _tissue_pixels(tissue, plan.hd, box)
    return _finish(num, den, norm, mask)
