"""Review PNGs on one pixel grid: slide thumbnail, colour-mapped heatmap, overlay, one-page figure.

Every PNG uses the thumbnail's grid: pixel ``(r, c)`` covers level-0 pixels from ``(c ds, r ds)``,
``ds`` the thumbnail's exact downsample (in each PNG's text chunk ``downsample``). The heatmap is
resampled bilinearly, centre on centre through level-0 coordinates, from the deepest heatmap
pyramid level that is not coarser than ``ds`` (so at most 2x, using the pyramid's 2x2 means for
the rest), then shown at display scale (:func:`smooth_display`: a Gaussian of ``display_smooth_um``
microns inside the tissue, times the slide's display gain, see
:func:`wsi_scaat.heatmaps.export.display_gain`). The pyramid and the OME-TIFFs keep the unsmoothed
values.

The overlay blends the colour-mapped heatmap over the thumbnail inside the tissue mask with per-pixel
opacity :func:`overlay_opacity`: 0 below ``overlay_low`` (the tissue shows through untouched), rising
linearly to ``overlay_alpha`` at ``overlay_high`` and above (clearly coloured); pixels outside the
tissue are the thumbnail's. Outlines (high-saliency regions, annotations) are drawn on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_scaat.atomic import atomic_output
from wsi_scaat.heatmaps.geojson import normalise
from wsi_scaat.heatmaps.ometiff import source_level, to_uint8

#: Top salient patches shown in the figure.
TOP_K = 4
#: Side (px) at which the figure's patches are read from the slide, at least.
PATCH_VIEW = 192
#: Longer side (px) of the images drawn in the figure's panels.
PANEL_SIDE = 800


def resample(
    values: np.ndarray, src_downsample: float, shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """Bilinear resampling from a grid of ``src_downsample`` onto ``shape`` at ``downsample`` (vs level 0)."""
    a = downsample / src_downsample  # output pixel centre (c + 0.5) ds -> source (c + 0.5) a - 0.5
    m = np.array([[a, 0.0, 0.5 * a - 0.5], [0.0, a, 0.5 * a - 0.5]], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    src = np.nan_to_num(np.asarray(values, dtype=np.float32))
    return cv2.warpAffine(src, m, (shape[1], shape[0]), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def heatmap_image(
    levels: Sequence[Any], heatmap_downsample: float, shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """Heatmap values (float32 in [0, 1]) on the grid ``shape`` at ``downsample``, from the nearest level."""
    k = source_level(downsample, heatmap_downsample, len(levels))
    level = np.asarray(levels[k][...], dtype=np.float32)
    return np.clip(resample(level, heatmap_downsample * 2**k, shape, downsample), 0.0, 1.0)


def mask_image(
    mask: np.ndarray, mask_downsample: float, shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """Boolean mask on the grid: the mask pixel under each pixel centre (nearest, clamped)."""
    rows = np.clip(
        ((np.arange(shape[0]) + 0.5) * downsample / mask_downsample).astype(np.int64), 0, mask.shape[0] - 1
    )
    cols = np.clip(
        ((np.arange(shape[1]) + 0.5) * downsample / mask_downsample).astype(np.int64), 0, mask.shape[1] - 1
    )
    return np.asarray(mask)[np.ix_(rows, cols)] > 0


def colorize(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGB uint8 of values in [0, 1] through a (256, 3) lookup table."""
    return np.take(lut, to_uint8(values), axis=0)


def smooth_display(
    values: np.ndarray, tissue: np.ndarray | None, sigma_px: float, gain: float = 1.0
) -> np.ndarray:
    """``values`` smoothed by a Gaussian of ``sigma_px`` pixels inside ``tissue`` (normalised convolution:
    non-tissue neither dims nor bleeds into the tissue's edge), 0 outside it (not smoothed, nor masked,
    for sigma < 0.3), times ``gain``, clipped to [0, 1]."""
    v = np.asarray(values, dtype=np.float32)
    if sigma_px < 0.3:
        return np.clip(v * np.float32(gain), 0.0, 1.0)
    t = np.ones(v.shape, np.float32) if tissue is None else tissue.astype(np.float32)
    k = int(np.ceil(4 * sigma_px)) * 2 + 1
    num = cv2.GaussianBlur(v * t, (k, k), sigma_px, borderType=cv2.BORDER_CONSTANT)
    den = cv2.GaussianBlur(t, (k, k), sigma_px, borderType=cv2.BORDER_CONSTANT)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-6)
    return np.clip(out * t * np.float32(gain), 0.0, 1.0)


def overlay_opacity(values: np.ndarray, alpha: float, low: float, high: float) -> np.ndarray:
    """Opacity of the overlay: 0 at or below ``low``, ``alpha`` at or above ``high``, linear between."""
    ramp = (np.asarray(values, dtype=np.float32) - np.float32(low)) / np.float32(max(high - low, 1e-6))
    return np.float32(alpha) * np.clip(ramp, 0.0, 1.0)


def blend(
    thumb: np.ndarray,
    values: np.ndarray,
    lut: np.ndarray,
    alpha: float,
    tissue: np.ndarray,
    low: float = 0.0,
    high: float = 1.0,
) -> np.ndarray:
    """Thumbnail with the colour-mapped heatmap laid over it inside ``tissue``, opacity
    :func:`overlay_opacity` (``low = 0, high = 1``: ``alpha * value``)."""
    a = (overlay_opacity(values, alpha, low, high) * tissue).astype(np.float32)
    out = thumb.astype(np.float32)
    delta = colorize(values, lut).astype(np.float32)
    delta -= out
    delta *= a[..., None]
    out += delta  # thumb * (1 - a) + colour * a, in place
    blended = np.rint(out).astype(np.uint8)
    blended[a == 0] = thumb[a == 0]  # exactly the thumbnail where nothing is laid over
    return blended


def draw_outlines(
    image: np.ndarray, polygons: Sequence[Any], downsample: float, color: tuple[int, int, int], width: int
) -> np.ndarray:
    """``image`` (RGB, on a grid of ``downsample``) with the outlines of shapely ``polygons`` (level-0
    px; exteriors and holes) drawn ``width`` px wide in ``color``, in place; returns it."""
    shift = 4  # sub-pixel vertices: 1/16 px
    rings = []
    for poly in polygons:
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, dtype=np.float64) / downsample - 0.5  # pixel centres
            rings.append(np.rint(xy * (1 << shift)).astype(np.int32).reshape(-1, 1, 2))
    if rings:
        cv2.polylines(
            image, rings, True, tuple(int(c) for c in color), max(1, int(width)), cv2.LINE_AA, shift
        )
    return image


def write_png(final: Path, image: np.ndarray, text: dict[str, str]) -> Path:
    """Atomically write an RGB PNG with ``text`` in its text chunk."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    with atomic_output(final) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG", pnginfo=info)
    return Path(final)


@dataclass(frozen=True)
class PatchView:
    """A patch shown in the figure: RGB pixels, its normalised saliency map and a caption."""

    image: np.ndarray
    saliency: np.ndarray
    caption: str


def top_patches(
    reader: Any,
    coords: np.ndarray,
    size0: float,
    maps: Any,
    score: np.ndarray,
    probs: np.ndarray,
    low: float,
    high: float,
    k: int = TOP_K,
    value: str = "saliency",
    prob: np.ndarray | None = None,
) -> list[PatchView]:
    """The ``k`` patches of highest ``score``, read from the slide at a level near ``PATCH_VIEW`` px, each
    with the values it adds to the heatmap (``maps``: the store array ``value`` is made of)."""
    from wsi_scaat.heatmaps.values import pixel_values

    level = reader.info.best_level_for_downsample(max(1.0, size0 / PATCH_VIEW))
    side = max(1, int(round(size0 / reader.info.level_downsamples[level])))
    views = []
    for i in np.argsort(-np.asarray(score), kind="stable")[:k].tolist():
        x, y = (int(v) for v in coords[i])
        image = reader.read_region((x, y), level, (side, side))
        caption = f"#{i}  s={score[i]:.2f}  p={probs[i]:.2f}"
        p = None if prob is None else prob[i : i + 1]
        raw = None if value == "probability" else np.asarray(maps[i])[None]
        pix = pixel_values(value, raw, p, int(maps.shape[-1]))[0]
        views.append(PatchView(image, normalise(pix, low, high).astype(np.float32), caption))
    return views


@dataclass(frozen=True)
class Outline:
    """Polygons (level-0 px) drawn on the figure's overlay, with their colour and legend text."""

    polygons: Sequence[Any]
    color: tuple[int, int, int]
    label: str


#: Outline width (px) on the figure's panels.
OUTLINE_WIDTH = 2


def write_figure(
    final: Path,
    thumb: np.ndarray,
    values: np.ndarray,
    overlay: np.ndarray,
    colormap: str,
    lines: Sequence[str],
    patches: Sequence[PatchView] = (),
    title: str = "",
    *,
    label: str = "saliency",
    downsample: float = 1.0,
    outlines: Sequence[Outline] = (),
) -> Path:
    """One-page figure: thumbnail, heatmap with colour bar (``label``: what the colour means), overlay
    with ``outlines`` (its images on a grid of ``downsample`` level-0 px) and their legend, ``lines`` of
    numbers, top patches."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(16, 9.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[3.0, 1.3])
    scale = min(1.0, PANEL_SIDE / max(thumb.shape[:2]))
    size = (max(1, round(thumb.shape[1] * scale)), max(1, round(thumb.shape[0] * scale)))
    panel_ds = downsample * thumb.shape[1] / size[0]
    panels = [
        (cv2.resize(img, size, interpolation=cv2.INTER_AREA), name)
        for img, name in ((thumb, "slide"), (values, label), (overlay, "overlay"))
    ]
    for o in outlines:  # drawn at the panel's scale, so that they keep their width
        draw_outlines(panels[2][0], o.polygons, panel_ds, o.color, OUTLINE_WIDTH)
    for col, (img, name) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        if img.ndim == 2:
            ax.imshow(img, cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
        if col == 1:
            fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormap), ax=ax, shrink=0.8, label=label)
        if col == 2 and outlines:
            handles = [Line2D([], [], color=np.array(o.color) / 255, lw=2.5, label=o.label) for o in outlines]
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=1, fontsize=9,
                      frameon=False)  # fmt: skip
    text = fig.add_subplot(grid[1, 0])
    text.set_axis_off()
    text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=10)
    if patches:
        row = grid[1, 1:].subgridspec(1, len(patches))
        for j, view in enumerate(patches):
            ax = fig.add_subplot(row[0, j])
            h, w = view.image.shape[:2]
            ax.imshow(view.image, extent=(0, w, h, 0))
            ax.imshow(view.saliency, cmap=colormap, vmin=0.0, vmax=1.0, alpha=0.45, extent=(0, w, h, 0))
            ax.set_title(view.caption, fontsize=9)
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    with atomic_output(final) as tmp:
        fig.savefig(tmp, format="png")
    return Path(final)
