"""Tissue detection on a low-resolution thumbnail: Otsu on saturation, then morphology."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
from PIL import Image
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon, mapping
from skimage.filters import threshold_otsu

from wsi_scaat.sections import TissueConfig
from wsi_scaat.sections import field_default as _d
from wsi_scaat.slides.reader import SlideReader


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask of a thumbnail; pixel (r, c) covers level-0 pixels ``downsample`` wide."""

    mask: np.ndarray
    downsample: float

    def fraction_in(self, x0: np.ndarray, y0: np.ndarray, size0: float) -> np.ndarray:
        """Fraction of tissue in level-0 squares with top-left ``(x0, y0)`` and side ``size0``.

        Uses an integral image of the mask, so it costs O(1) per square.
        """
        m = self.mask.astype(np.float64)
        integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
        integral[1:, 1:] = m.cumsum(0).cumsum(1)
        h, w = m.shape

        def idx(v: np.ndarray, hi: int) -> np.ndarray:
            return np.clip(np.round(v / self.downsample).astype(np.int64), 0, hi)

        c0, c1 = idx(np.asarray(x0, float), w), idx(np.asarray(x0, float) + size0, w)
        r0, r1 = idx(np.asarray(y0, float), h), idx(np.asarray(y0, float) + size0, h)
        c1, r1 = np.maximum(c1, c0 + 1).clip(max=w), np.maximum(r1, r0 + 1).clip(max=h)
        area = np.maximum((r1 - r0) * (c1 - c0), 1)
        total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        return total / area


def detect_tissue(
    rgb: np.ndarray,
    downsample: float,
    *,
    min_saturation: float = _d(TissueConfig, "min_saturation"),
    closing_um: float = _d(TissueConfig, "closing_um"),
    min_area_um2: float = _d(TissueConfig, "min_area_um2"),
    max_hole_um2: float = _d(TissueConfig, "max_hole_um2"),
    mpp: float = 0.5,
) -> TissueMask:
    """Tissue mask of an RGB thumbnail.

    Otsu threshold on HSV saturation (floored at ``min_saturation`` so a blank slide gives no
    tissue), excluding near-black pixels (pen, slide edges); then closing with a disk of
    ``closing_um`` microns, filling of holes smaller than ``max_hole_um2`` (large lumina stay
    background), and removal of components smaller than ``min_area_um2``.
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], 5 if min(rgb.shape[:2]) > 10 else 1).astype(np.float32) / 255
    thr = max(float(threshold_otsu(sat)) if sat.max() > sat.min() else 1.0, min_saturation)
    mask = (sat > thr) & (hsv[..., 2] > 25)
    um_per_px = mpp * downsample
    radius = max(1, int(round(closing_um / um_per_px / 2)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, disk).astype(bool)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    mask = mask | _components_in_range(holes, um_per_px, None, max_hole_um2)
    mask = _components_in_range(mask, um_per_px, min_area_um2, None)
    return TissueMask(mask=mask, downsample=float(downsample))


def _components_in_range(
    mask: np.ndarray, um_per_px: float, min_um2: float | None, max_um2: float | None
) -> np.ndarray:
    """Connected components of ``mask`` whose area (um^2) lies within the bounds."""
    labels, n = ndimage.label(mask)
    if not n:
        return mask
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)) * um_per_px**2
    keep = np.ones(n, bool)
    if min_um2 is not None:
        keep &= areas >= min_um2
    if max_um2 is not None:
        keep &= areas < max_um2
    return np.concatenate([[False], keep])[labels]


def tissue_settings(cfg: TissueConfig) -> dict[str, float]:
    """The keyword arguments of :func:`detect_tissue` held by a ``tissue`` config section."""
    return {k: getattr(cfg, k) for k in ("min_saturation", "closing_um", "min_area_um2", "max_hole_um2")}


def no_tissue_message(cfg: TissueConfig, thumbnail_mpp: float) -> str:
    """Why the tissue mask is empty, with the settings that would change it."""
    return (
        f"no tissue detected (tissue.min_area_um2={cfg.min_area_um2:g}, "
        f"tissue.min_saturation={cfg.min_saturation:g}, tissue.thumbnail_mpp={thumbnail_mpp:g}): "
        "for small fragments lower min_area_um2 (--tissue-min-area-um2) or thumbnail_mpp; "
        "for faint stains lower min_saturation (--tissue-min-saturation)"
    )


def detect_slide_tissue(
    reader: SlideReader, thumbnail_mpp: float = _d(TissueConfig, "thumbnail_mpp"), **kwargs: float
) -> tuple[TissueMask, np.ndarray]:
    """Read a thumbnail at ``thumbnail_mpp`` and detect tissue on it; returns mask and thumbnail."""
    mpp = reader.info.require_mpp()
    thumb, ds = reader.read_thumbnail(max(1.0, thumbnail_mpp / mpp))
    return detect_tissue(thumb, ds, mpp=mpp, **kwargs), thumb


def mask_polygons(tissue: TissueMask) -> list[Polygon]:
    """Outlines of the tissue mask as valid polygons (with holes) in level-0 pixel coordinates."""
    contours, hierarchy = cv2.findContours(
        tissue.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    polys: list[Polygon] = []
    if hierarchy is None:
        return polys
    hierarchy = hierarchy[0]
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1 or len(contour) < 3:
            continue  # holes are attached to their parent below
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(contours[child][:, 0, :] * tissue.downsample)
            child = hierarchy[child][0]
        poly = shapely.make_valid(Polygon(contour[:, 0, :] * tissue.downsample, holes))
        parts = poly.geoms if hasattr(poly, "geoms") else [poly]
        polys.extend(p for p in parts if isinstance(p, Polygon) and p.area > 0)
    return polys


def save_tissue_png(tissue: TissueMask, path: Path, slide_id: str) -> None:
    """Write the mask as a PNG whose text chunk records its downsample and slide."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("downsample", repr(tissue.downsample))
    info.add_text("slide_id", slide_id)
    Image.fromarray(tissue.mask.astype(np.uint8) * 255).save(path, format="PNG", pnginfo=info)


def tissue_geojson(tissue: TissueMask, slide_id: str) -> str:
    """The mask's outline as a QuPath GeoJSON FeatureCollection (one locked 'tissue' annotation)."""
    polys = mask_polygons(tissue)
    features = []
    if polys:
        geom = shapely.set_precision(MultiPolygon(polys) if len(polys) > 1 else polys[0], 0.01)
        features.append(
            {
                "type": "Feature",
                "geometry": mapping(geom),
                "properties": {
                    "objectType": "annotation",
                    "name": f"tissue {slide_id}",
                    "classification": {"name": "tissue", "color": [0, 160, 0]},
                    "isLocked": True,
                },
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": features}) + "\n"


def read_tissue_png(path: Path) -> TissueMask:
    """Read a mask written by :func:`write_tissue_outputs`."""
    with Image.open(path) as img:
        ds = float(img.text["downsample"])
        return TissueMask(mask=np.asarray(img) > 0, downsample=ds)
