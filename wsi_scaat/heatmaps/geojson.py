"""QuPath GeoJSON: one locked tile per patch, and the outlines of the high-saliency regions.

Coordinates are level-0 slide pixels, so QuPath places the objects on the slide itself. Both files
are FeatureCollections written feature by feature (streamed), numbers rounded to
``SIGNIFICANT`` significant digits. ``measurements`` is a JSON object (name -> number), the form
QuPath 0.4+ reads; ``Measure > Show measurement maps`` then colours objects by any of them.

Per-patch saliency: every value ``m`` the patch adds to the heatmap (its map, or what the heatmap's
``value`` makes of it: see :mod:`wsi_scaat.heatmaps.values`) is normalised like the heatmap,
``clip((m - low) / (high - low), 0, 1)`` with the heatmap's ``normalization`` ``{low, high}``
(``m > low`` when ``high == low``; identity when the heatmap was not normalised);
``saliency_mean`` is the mean of the normalised values, ``saliency_max`` their maximum.

Regions: the pixels of one heatmap pyramid level with value ``>= threshold`` are traced with
marching squares (:func:`skimage.measure.find_contours` on the binary mask, 8-connected regions)
and the pixel corners it cuts are put back, so outlines are the pixels' own edges. Rings winding
around high pixels are outer boundaries, the others holes, each given to the smallest outer ring
that contains it. Polygons are simplified by ``tolerance`` pixels of that level (topology kept),
moved to level-0 pixels, made valid when needed (polygon parts kept), and dropped when smaller
than ``min_area_px`` level-0 pixels; holes smaller than that are filled too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping

from wsi_scaat.atomic import atomic_output

#: Significant digits of the numbers written.
SIGNIFICANT = 5
#: Patch maps read per batch (bytes of float16).
MAP_BATCH_BYTES = 8 * 1024**2
#: QuPath class and colour of the high-saliency regions.
REGION_CLASS = "saliency-high"
REGION_COLOR = (230, 50, 30)


def num(value: float) -> float | None:
    """``value`` rounded to ``SIGNIFICANT`` significant digits (None for NaN/inf: left out of the JSON)."""
    v = float(value)
    return float(f"{v:.{SIGNIFICANT}g}") if np.isfinite(v) else None


def normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map raw saliency to [0, 1] like the heatmap; non-finite values read as 0 (NaN) or large (inf)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=65504.0, neginf=0.0)
    if high > low:
        return np.clip((v - np.float32(low)) / np.float32(high - low), 0.0, 1.0)
    return (v > low).astype(np.float32)


def patch_saliency(
    maps: Any, low: float, high: float, value: str = "saliency", prob: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch mean and max of the normalised heatmap ``value`` of the maps ``(N, h, w)`` (the
    store array the value is made of) and the target-class probabilities ``prob``, in bounded batches."""
    from wsi_scaat.heatmaps.values import pixel_values

    n = int(maps.shape[0])
    per_patch = int(np.prod(maps.shape[1:])) * 2
    chunk = int(getattr(maps, "chunks", (64,))[0])
    batch = max(chunk, (MAP_BATCH_BYTES // max(per_patch, 1)) // chunk * chunk)
    means, maxes = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for start in range(0, n, batch):
        p = None if prob is None else prob[start : start + batch]
        raw = None if value == "probability" else maps[start : start + batch]
        v = raw if value == "saliency" else pixel_values(value, raw, p, maps.shape[-1])
        m = normalise(v, low, high).reshape(-1, per_patch // 2)
        means[start : start + len(m)] = m.mean(1)
        maxes[start : start + len(m)] = m.max(1)
    return means, maxes


def write_features(final: Path, features: Iterable[dict[str, Any]]) -> int:
    """Stream ``features`` into a GeoJSON FeatureCollection written atomically; returns their count."""
    count = 0
    with atomic_output(final) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for feature in features:
            f.write((",\n" if count else "") + json.dumps(feature, separators=(",", ":"), allow_nan=False))
            count += 1
        f.write("\n]}\n")
    return count


def tile_features(
    coords: np.ndarray,
    size0: float,
    probs: np.ndarray,
    class_names: Sequence[str],
    saliency_mean: np.ndarray,
    saliency_max: np.ndarray,
) -> Iterator[dict[str, Any]]:
    """One locked QuPath tile per patch: a closed square of side ``size0`` at its top-left ``coords``."""
    s = int(size0) if float(size0).is_integer() else float(size0)
    keys = [*(f"prob_{name}" for name in class_names), "saliency_mean", "saliency_max"]
    for i, (x, y) in enumerate(np.asarray(coords).tolist()):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        values = [*probs[i], saliency_mean[i], saliency_max[i]]
        measurements = {k: v for k, v in zip(keys, map(num, values), strict=True) if v is not None}
        yield {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "tile",
                "isLocked": True,
                "name": f"patch {i}",
                "measurements": measurements,
            },
        }


def _pixel_outline(contour: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """Marching-squares ``contour`` (row, col) with the pixel corners it cuts put back, except at saddles.

    Crossings of a binary mask lie on pixel edges; a diagonal step cuts the pixel corner between
    its ends. Re-inserting that corner gives the outline of the pixels themselves (exact areas,
    straight sides); at a saddle (two diagonal pixels) the cut is kept, so 8-connected pixels stay
    one simple ring.
    """
    p, q = contour[:-1], contour[1:]
    diagonal = (p[:, 0] != q[:, 0]) & (p[:, 1] != q[:, 1])
    row_on_edge = (p[:, 0] % 1) == 0.5
    corner = np.where(row_on_edge[:, None], np.stack([p[:, 0], q[:, 1]], 1), np.stack([q[:, 0], p[:, 1]], 1))
    r0, c0 = np.floor(corner).astype(np.int64).T
    a, b = padded[r0, c0], padded[r0, c0 + 1]
    c, d = padded[r0 + 1, c0], padded[r0 + 1, c0 + 1]
    saddle = (a == d) & (b == c) & (a != b)
    idx = np.flatnonzero(diagonal & ~saddle)
    return np.insert(contour, idx + 1, corner[idx], axis=0)


def _rings(mask: np.ndarray, min_area: float = 0.0) -> tuple[list[Polygon], list[Polygon]]:
    """Outer rings and holes (pixel-centre x, y) of the ``True`` regions with area >= ``min_area``."""
    from skimage.measure import find_contours

    padded = np.pad(mask, 1).astype(np.float32)
    outers, holes = [], []
    for c in find_contours(padded, 0.5, fully_connected="high", positive_orientation="high"):
        cut = 0.5 * abs(np.dot(c[:-1, 0], c[1:, 1]) - np.dot(c[1:, 0], c[:-1, 1]))
        if len(c) < 4 or cut + len(c) / 8 < min_area:  # corners cut are 1/8 px^2 each
            continue
        xy = _pixel_outline(c, padded)[:-1, ::-1] - 1.0
        first = np.lexsort((xy[:, 1], xy[:, 0]))[0]  # an extreme vertex: simplification keeps the start
        ring = Polygon(np.roll(xy, -first, axis=0))
        if ring.area >= min_area:
            (holes if ring.exterior.is_ccw else outers).append(ring)
    return outers, holes


def _polygon_parts(geom: Any) -> list[Polygon]:
    """Valid polygon parts of ``geom`` (``make_valid`` when needed; lines and points dropped)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, Polygon):
        return [geom] if not geom.is_empty else []
    return [p for g in getattr(geom, "geoms", []) for p in _polygon_parts(g)]


def region_polygons(
    values: np.ndarray,
    threshold: float,
    downsample: float,
    *,
    min_area_px: float = 0.0,
    tolerance: float = 1.0,
) -> list[Polygon]:
    """Valid polygons of ``values >= threshold`` on a level of ``downsample``; level-0 px, largest first."""
    mask = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=-np.inf) >= threshold
    outers, holes = _rings(mask, min_area_px / downsample**2)
    if not outers:
        return []
    owner: dict[int, list[Polygon]] = {}
    if holes:  # a hole belongs to the smallest outer ring around a point of its boundary
        areas = np.array([p.area for p in outers])
        corners = shapely.points([h.exterior.coords[0] for h in holes])
        hole_idx, outer_idx = shapely.STRtree(outers).query(corners, predicate="within")
        for h in np.unique(hole_idx):
            candidates = outer_idx[hole_idx == h]
            owner.setdefault(int(candidates[np.argmin(areas[candidates])]), []).append(holes[h])

    def to_level0(c: np.ndarray) -> np.ndarray:  # pixel centres -> level-0 pixels
        return np.round((c + 0.5) * downsample, 3)

    polygons = []
    for i, outer in enumerate(outers):
        kept = [h.exterior for h in owner.get(i, [])]
        poly = shapely.simplify(Polygon(outer.exterior, kept), tolerance, preserve_topology=True)
        for part in _polygon_parts(shapely.transform(poly, to_level0)):
            if part.area >= min_area_px:
                polygons.append(part)
    return sorted(polygons, key=lambda p: -p.area)


def centres_inside(rings: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd scanline fill: pixel ``(r, c)`` is True when its centre ``(c, r)`` lies inside ``rings``.

    ``rings`` are closed ``(n, 2)`` arrays of ``(x, y)`` in pixel-centre coordinates. Each edge
    crossing of a row toggles the pixels right of it; cost is O(pixels + crossings).
    """
    h, w = shape
    toggles = np.zeros((h, w + 1), np.uint8)  # parity survives uint8 wrap-around
    for ring in rings:
        (x0, y0), (x1, y1) = ring[:-1].T, ring[1:].T
        first = np.ceil(np.minimum(y0, y1)).astype(np.int64)  # rows lo <= r < hi: vertices counted once
        n = np.maximum(np.ceil(np.maximum(y0, y1)).astype(np.int64) - first, 0)
        e = np.repeat(np.arange(len(n)), n)
        rows = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + first[e]
        xs = x0[e] + (rows - y0[e]) / (y1[e] - y0[e]) * (x1[e] - x0[e])
        keep = (rows >= 0) & (rows < h)
        cols = np.clip(np.floor(xs[keep]).astype(np.int64) + 1, 0, w)
        np.add.at(toggles, (rows[keep], cols), 1)
    return (np.cumsum(toggles, axis=1, dtype=np.uint8)[:, :w] & 1).astype(bool)


def _pixels_in(poly: Polygon, values: np.ndarray, downsample: float) -> np.ndarray:
    """Values of the pixels of ``values`` (a level of ``downsample``) whose centres lie in ``poly``."""
    minx, miny, maxx, maxy = (b / downsample - 0.5 for b in poly.bounds)
    c0, r0 = max(0, int(np.floor(minx))), max(0, int(np.floor(miny)))
    c1, r1 = min(values.shape[1], int(np.ceil(maxx)) + 1), min(values.shape[0], int(np.ceil(maxy)) + 1)
    if r1 <= r0 or c1 <= c0:
        return values[:0, 0]
    rings = [np.asarray(r.coords) / downsample - 0.5 - (c0, r0) for r in (poly.exterior, *poly.interiors)]
    return values[r0:r1, c0:c1][centres_inside(rings, (r1 - r0, c1 - c0))]


def region_features(
    polygons: Sequence[Polygon],
    values: np.ndarray,
    downsample: float,
    mpp: float,
    centres: np.ndarray,
    positive_probs: np.ndarray,
    threshold: float,
) -> Iterator[dict[str, Any]]:
    """QuPath annotations of class ``REGION_CLASS`` with area, saliency and patch-probability measurements.

    ``saliency_mean`` averages the level's pixels whose centres lie in the polygon; ``prob_mean``
    averages ``positive_probs`` over the patches whose ``centres`` (level-0 x, y) lie in it (left
    out when there are none: QuPath measurements are numbers).
    """
    cx, cy = np.asarray(centres, dtype=np.float64).reshape(-1, 2).T
    for i, poly in enumerate(polygons):
        inside = _pixels_in(poly, values, downsample)
        if inside.size == 0:  # sliver: sample the pixel under a point of the polygon
            p = poly.representative_point()
            r = min(int(p.y / downsample), values.shape[0] - 1)
            inside = values[r, min(int(p.x / downsample), values.shape[1] - 1)][None]
        minx, miny, maxx, maxy = poly.bounds
        near = np.flatnonzero((cx >= minx) & (cx <= maxx) & (cy >= miny) & (cy <= maxy))
        hits = near[shapely.contains_xy(poly, cx[near], cy[near])] if near.size else near
        measurements = {
            "area_um2": num(poly.area * mpp**2),
            "saliency_mean": num(np.nanmean(inside)),
            "saliency_max": num(np.nanmax(inside)),
            "prob_mean": num(positive_probs[hits].mean()) if hits.size else None,
            "n_patches": int(hits.size),
        }
        measurements = {k: v for k, v in measurements.items() if v is not None}  # QuPath wants numbers
        yield {
            "type": "Feature",
            "geometry": mapping(poly),
            "properties": {
                "objectType": "annotation",
                "name": f"{REGION_CLASS} {i + 1} (>= {threshold:g})",
                "classification": {"name": REGION_CLASS, "color": list(REGION_COLOR)},
                "measurements": measurements,
            },
        }
