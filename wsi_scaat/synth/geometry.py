"""Polygon helpers shared by the synthetic presets: snapping to a 0.01 px grid, blobs, points."""

from __future__ import annotations

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import Polygon

GRID = 0.01  # coordinate precision (px) of generated polygons


def _polygons(geom, min_area: float = 0.0) -> list[Polygon]:
    """Polygons of a (multi)polygon / collection with area > min_area."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        parts = [geom]
    elif hasattr(geom, "geoms"):
        parts = [p for g in geom.geoms for p in _polygons(g)]
    else:
        parts = []
    return [p for p in parts if p.area > min_area]


def _snap(geom) -> list[Polygon]:
    return _polygons(shapely.set_precision(shapely.make_valid(geom), GRID), min_area=1.0)


def _blob(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    angle: float = 0.0,
    amp: float = 0.12,
    n: int = 256,
) -> Polygon:
    """Smooth star-shaped blob r(t) = 1 + sum_k a_k cos(k t + phi_k), k = 2..5, scaled/rotated."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += amp * (2 / k) * rng.uniform(0.3, 1.0) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    poly = Polygon(np.c_[rx * r * np.cos(t), ry * r * np.sin(t)])
    return affinity.translate(affinity.rotate(poly, angle, origin=(0, 0), use_radians=True), cx, cy)


def _random_point(rng: np.random.Generator, geom) -> tuple[float, float]:
    minx, miny, maxx, maxy = geom.bounds
    for _ in range(20):
        x, y = rng.uniform(minx, maxx, 256), rng.uniform(miny, maxy, 256)
        inside = np.flatnonzero(shapely.contains_xy(geom, x, y))
        if inside.size:
            return float(x[inside[0]]), float(y[inside[0]])
    p = geom.representative_point()
    return p.x, p.y
