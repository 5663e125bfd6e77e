"""QuPath-style GeoJSON annotations: reading, validation and per-patch coverage."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.ops import unary_union

from wsi_scaat.errors import WsiScaatError


class AnnotationError(WsiScaatError):
    """An annotation file is unreadable or holds unusable geometry."""


def _polygons(geom: shapely.Geometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom] if not geom.is_empty else []
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons(g)]
    return []


def read_annotations(path: str | Path, name: str | None = "lesion") -> list[Polygon]:
    """Polygons (level-0 pixels) of the features classified ``name`` (all when None).

    Invalid polygons (e.g. self-intersecting) are repaired with ``shapely.make_valid`` and a
    warning naming the file, never used as they are.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnnotationError(path, f"cannot read GeoJSON: {exc}") from exc
    if isinstance(doc, list):  # a bare list of features, as some tools write
        features = doc
    elif doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    else:
        features = [doc]
    polys: list[Polygon] = []
    for k, feat in enumerate(features):
        cls = ((feat.get("properties") or {}).get("classification") or {}).get("name")
        if name is not None and cls != name:
            continue
        try:
            geom = shape(feat["geometry"])
        except Exception as exc:
            raise AnnotationError(path, f"feature {k} has unusable geometry: {exc}") from exc
        if not isinstance(geom, Polygon | MultiPolygon):
            continue
        if not geom.is_valid:
            reason = shapely.is_valid_reason(geom)
            warnings.warn(f"{path}: feature {k} is invalid ({reason}); repaired with make_valid",
                          stacklevel=2)  # fmt: skip
            geom = shapely.make_valid(geom)
        polys.extend(_polygons(geom))
    return polys


def coverage_fraction(polygons: list[Polygon], coords: np.ndarray, size0: float) -> np.ndarray:
    """Fraction of each level-0 square (top-left ``coords``, side ``size0``) inside the polygons."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    frac = np.zeros(len(coords), dtype=np.float32)
    if not polygons or not len(coords):
        return frac
    region = unary_union(polygons)
    shapely.prepare(region)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size0, coords[:, 1] + size0)
    hit = shapely.intersects(region, boxes)
    if hit.any():
        frac[hit] = shapely.area(shapely.intersection(boxes[hit], region)) / float(size0) ** 2
    return np.clip(frac, 0.0, 1.0)
