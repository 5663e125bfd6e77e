"""Ground truth for localisation: lesion polygons rasterised on patch maps and heatmap blocks.

A map pixel is lesion when its centre lies inside (or on the boundary of) the union of the lesion
polygons; pixel ``(i, j)`` of a patch at level-0 ``(x, y)`` has its centre at
``(x + (j + 0.5) * s, y + (i + 0.5) * s)`` with ``s = patch_size_level0 / map_size``, the same
geometry the stitcher uses (docs/contracts.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.ops import unary_union

from wsi_scaat.annotations import read_annotations


class LesionRegion:
    """The union of a slide's lesion polygons, prepared for fast point-in-polygon queries."""

    def __init__(self, polygons: list[Polygon]) -> None:
        self.geometry = unary_union(polygons) if polygons else None
        if self.geometry is not None:
            shapely.prepare(self.geometry)

    @classmethod
    def from_geojson(cls, path: str | Path | None, name: str = "lesion") -> LesionRegion:
        """The lesion region of an annotation file (empty when ``path`` is None)."""
        return cls(read_annotations(path, name) if path is not None else [])

    @property
    def empty(self) -> bool:
        return self.geometry is None or self.geometry.is_empty

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Boolean array: the level-0 points ``(xs, ys)`` inside the region (boundary included)."""
        xs, ys = np.broadcast_arrays(np.asarray(xs, np.float64), np.asarray(ys, np.float64))
        if self.empty:
            return np.zeros(xs.shape, dtype=bool)
        return shapely.intersects_xy(self.geometry, xs, ys)

    def patch_masks(self, coords: np.ndarray, size0: float, map_size: int) -> np.ndarray:
        """(N, map_size, map_size) bool lesion masks of the patches with level-0 top-left ``coords``."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        centre = (np.arange(map_size, dtype=np.float64) + 0.5) * (float(size0) / map_size)
        xs = coords[:, 0, None, None] + centre[None, None, :]
        ys = coords[:, 1, None, None] + centre[None, :, None]
        return self.contains(xs, ys)

    def grid_mask(self, rows: tuple[int, int], cols: tuple[int, int], pixel: float) -> np.ndarray:
        """Lesion mask of heatmap pixels ``rows[0]:rows[1]``, ``cols[0]:cols[1]`` (pixel side ``pixel``)."""
        ys = (np.arange(*rows, dtype=np.float64) + 0.5) * pixel
        xs = (np.arange(*cols, dtype=np.float64) + 0.5) * pixel
        return self.contains(xs[None, :], ys[:, None])
