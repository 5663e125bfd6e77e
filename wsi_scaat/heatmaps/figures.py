"""Review PNGs on one pixel grid: slide thumbnail, colour-mapped heatmap, overlay, one-page figure.

Every PNG uses the thumbnail's grid: pixel ``(r, c)`` covers level-0 pixels from ``(c ds, r ds)``,
``ds`` the thumbnail's exact downsample (in each PNG's text chunk ``downsample``). The heatmap is
resampled bilinearly, centre on centre through level-0 coordinates, from the deepest heatmap
pyramid level that is not coarser than ``ds`` (so at most 2x, using the pyramid's 2x2 means for
the rest). The overlay blends the colour-mapped heatmap over the thumbnail with per-pixel alpha
``overlay_alpha * value`` inside the tissue mask: low saliency leaves the tissue visible, pixels
outside the tissue are the thumbnail's.
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


def blend(
    thumb: np.ndarray, values: np.ndarray, lut: np.ndarray, alpha: float, tissue: np.ndarray
) -> np.ndarray:
    """Thumbnail with the colour-mapped heatmap laid over it, alpha ``alpha * value`` inside ``tissue``."""
    a = (alpha * np.clip(values, 0.0, 1.0) * tissue).astype(np.float32)
    out = thumb.astype(np.float32)
    delta = colorize(values, lut).astype(np.float32)
    delta -= out
    delta *= a[..., None]
    out += delta  # thumb * (1 - a) + colour * a, in place
    blended = np.rint(out).astype(np.uint8)
    blended[a == 0] = thumb[a == 0]  # exactly the thumbnail where nothing is laid over
    return blended


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
) -> list[PatchView]:
    """The ``k`` patches of highest ``score``, read from the slide at a level near ``PATCH_VIEW`` px."""
    level = reader.info.best_level_for_downsample(max(1.0, size0 / PATCH_VIEW))
    side = max(1, int(round(size0 / reader.info.level_downsamples[level])))
    views = []
    for i in np.argsort(-np.asarray(score), kind="stable")[:k].tolist():
        x, y = (int(v) for v in coords[i])
        image = reader.read_region((x, y), level, (side, side))
        caption = f"#{i}  s={score[i]:.2f}  p={probs[i]:.2f}"
        views.append(PatchView(image, normalise(maps[i], low, high).astype(np.float32), caption))
    return views


def write_figure(
    final: Path,
    thumb: np.ndarray,
    values: np.ndarray,
    overlay: np.ndarray,
    colormap: str,
    lines: Sequence[str],
    patches: Sequence[PatchView] = (),
    title: str = "",
) -> Path:
    """One-page figure: thumbnail, heatmap with colour bar, overlay, ``lines`` of numbers, top patches."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[3.0, 1.3])
    scale = min(1.0, PANEL_SIDE / max(thumb.shape[:2]))
    size = (max(1, round(thumb.shape[1] * scale)), max(1, round(thumb.shape[0] * scale)))
    panels = [
        (cv2.resize(img, size, interpolation=cv2.INTER_AREA), name)
        for img, name in ((thumb, "slide"), (values, "saliency heatmap"), (overlay, "overlay"))
    ]
    for col, (img, name) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        if img.ndim == 2:
            ax.imshow(img, cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
        if col == 1:
            fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormap), ax=ax, shrink=0.8, label="saliency")
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
