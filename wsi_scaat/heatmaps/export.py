"""Per-slide exports for review: OME-TIFF heatmaps, PNGs and a figure, QuPath GeoJSON.

:func:`export_slide` reads a heatmap pyramid (``<slide_id>.heatmap.zarr``, see the contract in
:mod:`wsi_scaat.heatmaps`), its saliency store and the slide, and writes into ``out_dir``:

- ``<slide_id>.heatmap.ome.tif`` / ``.heatmap_rgb.ome.tif``: pyramidal OME-TIFFs (grey RGB,
  R = G = B = round(255 v), and colour-mapped) with the slide's level-0 size and mpp
  (:mod:`~wsi_scaat.heatmaps.ometiff`);
- ``.thumbnail.png``, ``.heatmap.png``, ``.overlay.png``, ``.figure.png`` on one pixel grid
  (:mod:`~wsi_scaat.heatmaps.figures`), the heatmap smoothed for display (``display_smooth_um``),
  the overlay clearly coloured where the heatmap is high and clear where it is low, with the
  high-saliency regions outlined; the figure also outlines the slide's annotations (ground truth)
  when given, and its legends say what the colour means (the heatmap's ``meaning``);
- ``.tiles.geojson`` (one tile per patch) and ``.regions.geojson`` (high-saliency outlines) for
  QuPath (:mod:`~wsi_scaat.heatmaps.geojson`).

All outputs are written under temporary names and renamed together at the end: when the export
fails, none of them appears under its final name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_scaat.annotations import read_annotations
from wsi_scaat.atomic import atomic_output
from wsi_scaat.errors import StoreError
from wsi_scaat.heatmaps import figures, geojson, ometiff, values
from wsi_scaat.heatmaps.bounded import value_map
from wsi_scaat.manifest import check_slide_id
from wsi_scaat.saliency.store import open_saliency_store
from wsi_scaat.sections import ExportConfig
from wsi_scaat.sections import field_default as _d
from wsi_scaat.slides import open_slide

#: Regions are traced on the finest heatmap level whose longer side is at most this.
REGION_MAX_SIDE = 4096
#: Simplification tolerance of the regions, in pixels of the level they are traced on.
REGION_TOLERANCE_PX = 1.0
#: Colours of the outlines on the overlay and the figure: the high-saliency regions (green: apart from
#: the colour map's black-red-yellow, the stain's pink and purple) and the annotations (ground truth).
REGION_OUTLINE_COLOR = (40, 220, 60)
ANNOTATION_COLOR = (0, 190, 255)
#: Outline width (px) of the regions on the overlay PNG, per 1000 px of its longer side.
OUTLINE_PER_1000 = 1.5
#: Display scale: 1 is this percentile (over the tissue) of the saliency factor smoothed for display.
DISPLAY_PERCENTILE = 99.0
#: Longer side of the in-memory map on which that percentile is taken.
DISPLAY_MAX_SIDE = 2048

OUTPUTS = {
    "ome_tiff": ".heatmap.ome.tif",
    "ome_tiff_rgb": ".heatmap_rgb.ome.tif",
    "thumbnail": ".thumbnail.png",
    "heatmap_png": ".heatmap.png",
    "overlay": ".overlay.png",
    "figure": ".figure.png",
    "tiles": ".tiles.geojson",
    "regions": ".regions.geojson",
}

_REQUIRED = ("slide_id", "heatmap_downsample", "slide_width", "slide_height", "mpp_level0")


@dataclass(frozen=True)
class Heatmap:
    """An opened heatmap pyramid: lazy levels ``"0"``, ``"1"``, ... and the group's attributes."""

    path: Path
    levels: list[zarr.Array]
    attrs: dict[str, Any]

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def downsample(self) -> float:
        """Level-0 slide pixels per heatmap level-0 pixel (``hd``)."""
        return float(self.attrs["heatmap_downsample"])

    @property
    def slide_size(self) -> tuple[int, int]:
        """The slide's level-0 ``(width, height)``."""
        return int(self.attrs["slide_width"]), int(self.attrs["slide_height"])

    @property
    def mpp(self) -> float:
        return float(self.attrs["mpp_level0"])

    @property
    def normalization(self) -> tuple[float, float]:
        """``(low, high)`` of the per-slide normalisation; ``(0, 1)`` (identity) when there was none."""
        norm = self.attrs.get("normalization") or {}
        if "low" in norm and "high" in norm:
            return float(norm["low"]), float(norm["high"])
        return 0.0, 1.0

    def level_downsample(self, k: int) -> float:
        """Level-0 slide pixels per pixel of heatmap level ``k``."""
        return self.downsample * 2**k

    @property
    def value(self) -> str:
        """What the heatmap's pixels mean (``stitch.value``; "saliency" for version-1 heatmaps)."""
        return str(self.attrs.get("value", "saliency"))

    @property
    def meaning(self) -> str:
        """Legend text of the colour, e.g. "lesion evidence (attribution > 0)"."""
        return str(
            self.attrs.get("meaning") or values.meaning(self.value, self.attrs.get("saliency_target", ""))
        )

    def level_fitting(self, max_side: int) -> int:
        """Finest level whose longer side is at most ``max_side`` (the last level if none is)."""
        for k, level in enumerate(self.levels):
            if max(level.shape) <= max_side:
                return k
        return len(self.levels) - 1


def open_heatmap(path: str | Path) -> Heatmap:
    """Open a heatmap pyramid for reading; ``StoreError`` when it is missing or incomplete."""
    path = Path(path)
    if not path.exists():
        raise StoreError(path, "heatmap not found")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise StoreError(path, f"cannot open heatmap: {exc}") from exc
    attrs = dict(root.attrs)
    missing = [k for k in _REQUIRED if k not in attrs]
    levels = []
    while str(len(levels)) in root:
        levels.append(root[str(len(levels))])
    if missing or not levels:
        raise StoreError(path, f"not a wsi-scaat heatmap (missing {missing or 'level 0'})")
    return Heatmap(path, levels, attrs)


@dataclass(frozen=True)
class _Patches:
    """What the exports need from the saliency store (maps stay lazy)."""

    coords: np.ndarray
    size0: float
    probs: np.ndarray
    class_names: list[str]
    maps: zarr.Array  # the store array the heatmap value is made of
    prob: np.ndarray | None  # target-class probability per patch, when the value uses it
    saliency_mean: np.ndarray
    saliency_max: np.ndarray
    tissue: np.ndarray | None
    tissue_downsample: float
    gain: float  # display gain (see display_gain)

    @property
    def centres(self) -> np.ndarray:
        return self.coords + self.size0 / 2.0


def _read_patches(path: Path, hm: Heatmap, smooth_um: float) -> tuple[_Patches, dict[str, Any]]:
    store = open_saliency_store(path)
    if str(store.attrs.get("slide_id")) != hm.slide_id:
        raise StoreError(path, f"is for slide {store.attrs.get('slide_id')!r}, not {hm.slide_id!r}")
    probs = store.array("probs").astype(np.float64)
    names = [str(c) for c in store.attrs.get("class_names") or range(probs.shape[1])]
    source = store.signed if values.source_array(hm.value) == "signed" else store.maps
    prob = store.target_probability() if values.uses_probability(hm.value) else None
    mean, peak = geojson.patch_saliency(source, *hm.normalization, value=hm.value, prob=prob)
    gain = display_gain(path, hm, smooth_um)
    tissue = store.array("tissue_mask") if "tissue_mask" in store.root else None
    patches = _Patches(
        store.coords,
        float(store.attrs["patch_size_level0"]),
        probs,
        names,
        source,
        prob,
        mean,
        peak,
        tissue,
        float(store.attrs.get("tissue_downsample", 1.0)),
        gain,
    )
    return patches, {**store.attrs, **hm.attrs}


def display_gain(saliency_store: Path, hm: Heatmap, smooth_um: float, percentile: float = DISPLAY_PERCENTILE,
                 max_side: int = DISPLAY_MAX_SIDE) -> float:  # fmt: skip
    """Gain of the displayed heatmap: 1 / the ``percentile``, over the tissue, of the slide's saliency
    factor (the heatmap's value without the probability: ``saliency``, or ``evidence``) normalised as
    the heatmap was (its ``normalization``) and smoothed by the display Gaussian, on a grid of at most
    ``max_side`` px; 1 when that is 0 or the heatmap is not normalised (``probability``).

    The heatmap is normalised per pixel, between percentiles of single pixels' values; smoothed to the
    scale it is looked at, its values shrink towards their local mean (on the demo, about 0.3 in a
    lesion). The gain brings that scale back to [0, 1]: 1 is as salient as the top 1% of the slide's
    tissue at display scale. As it is taken from the saliency factor, ``weighted`` tissue the model
    calls normal stays dark on a slide without lesion."""
    norm = hm.attrs.get("normalization") or {}
    if not values.normalised(hm.value) or norm.get("method") != "percentile":
        return 1.0
    factor = "evidence" if hm.value == "evidence" else "saliency"
    window = str(hm.attrs.get("window", "hann"))
    vm = value_map(saliency_store, factor, window=window, max_side=max_side, norm=hm.normalization)
    shown = figures.smooth_display(vm.values, vm.tissue, smooth_um / (hm.mpp * vm.pixel))
    tissue = vm.tissue if vm.tissue is not None else shown > 0
    ref = float(np.percentile(shown[tissue], percentile)) if tissue.any() else 0.0
    return 1.0 / ref if ref > 0 else 1.0


def _tissue_on(patches: _Patches, values: np.ndarray, downsample: float) -> np.ndarray:
    """Tissue on a grid of ``downsample`` (the store's mask; where there is none, heatmap > 0)."""
    if patches.tissue is None:
        return values > 0
    return figures.mask_image(patches.tissue, patches.tissue_downsample, values.shape, downsample)


def _summary(
    hm: Heatmap, attrs: dict[str, Any], patches: _Patches, high_fraction: float, threshold: float,
    smooth_um: float,
) -> list[str]:  # fmt: skip
    """The figure's lines of numbers."""
    low, high = hm.normalization
    n, positive = len(patches.coords), patches.class_names[-1]
    return [
        f"slide        {hm.slide_id}",
        f"model        {attrs.get('model_method', '?')}",
        f"saliency     {attrs.get('saliency_method', '?')} (target {attrs.get('saliency_target', '?')})",
        f"heatmap      {hm.value}: {hm.meaning}",
        f"patches      {n}  ({attrs.get('patch_size_out', attrs.get('patch_size', '?'))} px, "
        f"{hm.mpp:g} um/px at level 0)",
        f"mean P({positive})  {patches.probs[:, -1].mean():.3f}" if n else f"mean P({positive})  n/a",
        f"high saliency  {100 * high_fraction:.1f}% of tissue (shown heatmap >= {threshold:g})",
        f"normalised   [{low:.4g}, {high:.4g}] -> [0, 1] (pixels)",
        f"shown        Gaussian {smooth_um:g} um, x{patches.gain:.2f} "
        f"(1: top {100 - DISPLAY_PERCENTILE:g}% of tissue)",
        "",
        f"right: top {figures.TOP_K} patches by mean heatmap value",
        f"(s = that mean, p = P({positive}))",
    ]


@dataclass(frozen=True)
class Display:
    """How the PNGs and the figure show the heatmap (see :mod:`wsi_scaat.heatmaps.figures`)."""

    colormap: str
    alpha: float
    low: float
    high: float
    smooth_um: float


def _write_pngs(
    tmp: dict[str, Path], hm: Heatmap, reader: Any, patches: _Patches, lut: np.ndarray, display: Display,
    thumbnail_size: int, regions: list[Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:  # fmt: skip
    """Thumbnail, heatmap and overlay PNGs on one grid; returns (thumbnail, displayed heatmap values,
    overlay without outlines, downsample)."""
    thumb, ds = reader.read_thumbnail(max(hm.slide_size) / thumbnail_size)
    raw = figures.heatmap_image(hm.levels, hm.downsample, thumb.shape[:2], ds)
    tissue = _tissue_on(patches, raw, ds)
    shown = figures.smooth_display(raw, tissue, display.smooth_um / (hm.mpp * ds), patches.gain)
    overlay = figures.blend(thumb, shown, lut, display.alpha, tissue, display.low, display.high)
    text = {"slide_id": hm.slide_id, "downsample": repr(ds), "colormap": display.colormap,
            "value": hm.value, "meaning": hm.meaning, "display_smooth_um": repr(display.smooth_um),
            "display_gain": repr(patches.gain)}  # fmt: skip
    figures.write_png(tmp["thumbnail"], thumb, {"slide_id": hm.slide_id, "downsample": repr(ds)})
    figures.write_png(tmp["heatmap_png"], figures.colorize(shown, lut), text)
    width = max(1, round(OUTLINE_PER_1000 * max(thumb.shape[:2]) / 1000))
    outlined = figures.draw_outlines(overlay.copy(), regions, ds, REGION_OUTLINE_COLOR, width)
    opacity = {"overlay_alpha": repr(display.alpha), "overlay_low": repr(display.low),
               "overlay_high": repr(display.high), "outlines": f"{geojson.REGION_CLASS} regions"}  # fmt: skip
    figures.write_png(tmp["overlay"], outlined, text | opacity)
    return thumb, shown, overlay, ds


def _write_qupath(
    tmp: dict[str, Path],
    hm: Heatmap,
    patches: _Patches,
    threshold: float,
    min_area_um2: float,
    smooth_um: float = 0.0,
) -> tuple[float, list[Any]]:
    """Tiles and regions GeoJSON; returns the fraction of tissue at or above ``threshold`` and the
    regions' polygons (level-0 px).

    Regions are traced at display scale, as the overlay shows them: on the heatmap smoothed by a
    Gaussian of ``smooth_um`` microns (sigma) inside the tissue, times the display gain, so they
    outline where saliency is dense rather than single salient pixels; their measurements are of the
    smoothed heatmap itself (without the gain).
    """
    p = patches
    tiles = geojson.tile_features(p.coords, p.size0, p.probs, p.class_names, p.saliency_mean, p.saliency_max)
    geojson.write_features(tmp["tiles"], tiles)
    k = hm.level_fitting(REGION_MAX_SIDE)
    level, kds = np.nan_to_num(np.asarray(hm.levels[k][...], dtype=np.float32)), hm.level_downsample(k)
    tissue = _tissue_on(p, level, kds)
    level = figures.smooth_display(level, tissue, smooth_um / (hm.mpp * kds))
    shown = np.clip(level * np.float32(p.gain), 0.0, 1.0)
    min_area_px = min_area_um2 / hm.mpp**2
    polygons = geojson.region_polygons(
        shown, threshold, kds, min_area_px=min_area_px, tolerance=REGION_TOLERANCE_PX
    )
    regions = geojson.region_features(polygons, level, kds, hm.mpp, p.centres, p.probs[:, -1], threshold)
    geojson.write_features(tmp["regions"], regions)
    return (float((shown >= threshold)[tissue].mean()) if tissue.any() else 0.0), polygons


def export_slide(
    heatmap: Path,
    saliency_store: Path,
    out_dir: Path,
    *,
    slide_path: Path | None = None,
    colormap: str = _d(ExportConfig, "colormap"),
    overlay_alpha: float = _d(ExportConfig, "overlay_alpha"),
    region_threshold: float = _d(ExportConfig, "region_threshold"),
    min_region_area_um2: float = _d(ExportConfig, "min_region_area_um2"),
    thumbnail_size: int = _d(ExportConfig, "thumbnail_size"),
    tile_size: int = _d(ExportConfig, "tile_size"),
    ome_downsample: float = 1.0,
    region_smooth_um: float = _d(ExportConfig, "region_smooth_um"),
    overlay_low: float = _d(ExportConfig, "overlay_low"),
    overlay_high: float = _d(ExportConfig, "overlay_high"),
    display_smooth_um: float = _d(ExportConfig, "display_smooth_um"),
    annotations: Path | None = None,
    annotation_class: str | None = "lesion",
) -> dict[str, Path]:
    """Write every review export of one slide into ``out_dir``; returns their paths by kind.

    ``slide_path`` defaults to the heatmap's ``source_path``. ``ome_downsample`` > 1 writes the
    OME-TIFFs at that fraction of the slide's resolution (their mpp scaled to match). The PNGs'
    longer side is about ``thumbnail_size`` (the reader's exact thumbnail downsample, within ~1.5x).
    Regions are traced on the finest heatmap level with longer side <= ``REGION_MAX_SIDE``; the
    figure's high-saliency fraction is measured there, over the tissue mask of the saliency store.
    ``annotations``: the slide's GeoJSON, whose ``annotation_class`` polygons (all with None) the
    figure outlines as ground truth.
    """
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha}")
    if not 0.0 <= overlay_low < overlay_high <= 1.0:
        raise ValueError(f"need 0 <= overlay_low < overlay_high <= 1, got {overlay_low}, {overlay_high}")
    truth = read_annotations(annotations, annotation_class) if annotations is not None else None
    hm = open_heatmap(heatmap)
    patches, attrs = _read_patches(Path(saliency_store), hm, display_smooth_um)
    try:  # the id names the outputs: never a path out of out_dir
        check_slide_id(hm.slide_id)
    except ValueError as exc:
        raise StoreError(heatmap, str(exc)) from None
    final = {key: Path(out_dir) / f"{hm.slide_id}{suffix}" for key, suffix in OUTPUTS.items()}
    lut = ometiff.colormap_lut(colormap)
    with open_slide(slide_path or attrs["source_path"]) as reader, contextlib.ExitStack() as stack:
        if (reader.info.width, reader.info.height) != hm.slide_size:
            raise StoreError(
                heatmap,
                f"is for a {hm.slide_size[0]} x {hm.slide_size[1]} slide, but "
                f"{reader.info.path} is {reader.info.width} x {reader.info.height}",
            )
        # every output under a temporary name; all renamed when the block completes, none on error
        tmp = {key: stack.enter_context(atomic_output(path)) for key, path in final.items()}
        for key, rgb in (("ome_tiff", None), ("ome_tiff_rgb", lut)):
            ometiff.write_heatmap_ome_tiff(
                tmp[key], hm.levels, hm.downsample, hm.slide_size, hm.mpp, lut=rgb, tile_size=tile_size,
                ome_downsample=ome_downsample, name=f"{hm.slide_id} {hm.value}",
            )  # fmt: skip
        high_fraction, regions = _write_qupath(
            tmp, hm, patches, region_threshold, min_region_area_um2, region_smooth_um
        )
        display = Display(colormap, overlay_alpha, overlay_low, overlay_high, display_smooth_um)
        thumb, shown, overlay, ds = _write_pngs(
            tmp, hm, reader, patches, lut, display, thumbnail_size, regions
        )
        low, high = hm.normalization
        views = figures.top_patches(
            reader, patches.coords, patches.size0, patches.maps, patches.saliency_mean, patches.probs[:, -1],
            low, high, value=hm.value, prob=patches.prob,
        )  # fmt: skip
        lines = _summary(hm, attrs, patches, high_fraction, region_threshold, display_smooth_um)
        high_label = f"{geojson.REGION_CLASS} (shown heatmap >= {region_threshold:g})"
        outlines = [
            figures.Outline(regions, REGION_OUTLINE_COLOR, high_label + ("" if regions else ": none"))
        ]
        if truth is not None:
            what = f"{annotation_class or 'annotations'} (annotation, ground truth)" + (
                "" if truth else ": none"
            )
            outlines.append(figures.Outline(truth, ANNOTATION_COLOR, what))
        figures.write_figure(
            tmp["figure"],
            thumb,
            shown,
            overlay,
            colormap,
            lines,
            views,
            title=f"{hm.slide_id}: saliency review",
            label=hm.meaning,
            downsample=ds,
            outlines=outlines,
        )
    return final
