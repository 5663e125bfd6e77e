"""Overlapping saliency patches cut from the patch store's own patches.

The patch store holds a grid of ``P``-px patches every ``step = P - tiling overlap`` px (output
pixels, i.e. at the patch mpp). With a saliency ``overlap`` o > tiling overlap, patches are explained
every ``s = P - o`` px: besides the store's own, the extra patches at offsets ``(a s, b s)``,
``0 <= a, b < step / s`` (not both 0), from each store patch's top-left. ``s`` must divide ``step``
(a regular grid). An extra patch's pixels are cut from the mosaic of the store patches it overlaps
(its own cell and the next ones right and down); it exists only where the store holds every one of
them, i.e. inside the tiled tissue: at the tissue's edge the store's own patches cover the slide
alone. When the store was cut without resampling (``patch_mpp`` within 2% of the target, the usual
case) the extra patch is exactly the pixels tiling would have read there; otherwise each store
patch was resized on its own, and the mosaic joins resized pieces.

Extras come in row-major order of their top-left (y, then x), so neighbours share storage chunks.
Reading keeps the store patches of at most ``1 + max cell span`` grid rows in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_scaat.errors import WsiScaatError


@dataclass(frozen=True)
class OverlapPlan:
    """The extra patches: anchor cell (col, row), offset in strides (a, b), level-0 top-left."""

    cells: np.ndarray  # (M, 2) int64 anchor cell (i, j) of each extra patch
    offsets: np.ndarray  # (M, 2) int64 (a, b): the patch starts (a s, b s) px right of / below the anchor
    coords: np.ndarray  # (M, 2) int64 level-0 top-left x, y
    stride: int  # s, output px
    step: int  # the store's step, output px
    patch_size: int
    index: dict[tuple[int, int], int]  # store patch index of each cell (i, j)

    def __len__(self) -> int:
        return int(len(self.coords))

    def span(self, a: int) -> int:
        """Cells (from the anchor on) that a patch at offset ``a`` strides overlaps along one axis."""
        return (a * self.stride + self.patch_size - 1) // self.step + 1


def store_cells(coords: np.ndarray, step0: float) -> np.ndarray:
    """Grid cell (i, j) of each patch: its top-left divided by the level-0 step, rounded."""
    return np.rint(np.asarray(coords, np.float64) / step0).astype(np.int64).reshape(-1, 2)


def plan_overlap(coords: np.ndarray, attrs: dict[str, Any], overlap: int) -> OverlapPlan:
    """The extra patches of a store with ``coords`` and geometry ``attrs`` for saliency ``overlap`` px."""
    # the output size (store version 2: patch_size_out; version 1: patch_size)
    size = int(attrs.get("patch_size_out", attrs["patch_size"]))
    tiling_overlap = int(attrs.get("overlap", 0))
    if not 0 <= overlap < size:
        raise WsiScaatError(None, f"saliency overlap must be in [0, {size}) px, got {overlap}")
    step, stride, ds = size - tiling_overlap, size - overlap, float(attrs["downsample"])
    empty = np.zeros((0, 2), np.int64)
    if stride >= step:  # the store's own grid is at least this dense
        return OverlapPlan(empty, empty, empty, step, step, size, {})
    if step % stride:
        valid = [size - step // k for k in range(1, step + 1) if step % k == 0]
        raise WsiScaatError(
            None,
            f"saliency overlap {overlap} px gives a stride of {stride} px that does not divide the tiling "
            f"step of {step} px; choose an overlap among {valid}",
        )
    cells = store_cells(coords, step * ds)
    index = {(int(i), int(j)): n for n, (i, j) in enumerate(cells.tolist())}
    k = step // stride
    plan = OverlapPlan(empty, empty, empty, stride, step, size, index)
    out_cells, out_offsets = [], []
    ordered = cells[np.lexsort((cells[:, 0], cells[:, 1]))]
    starts = np.flatnonzero(np.diff(ordered[:, 1], prepend=ordered[0, 1] - 1)) if len(ordered) else []
    for row in np.split(ordered, starts[1:]) if len(ordered) else []:
        j = int(row[0, 1])  # row-major over (y, x): cell row, offset row, cell column, offset column
        for b in range(k):
            for i in row[:, 0].tolist():
                for a in range(k):
                    if (a, b) == (0, 0):
                        continue
                    need = ((i + dx, j + dy) for dx in range(plan.span(a)) for dy in range(plan.span(b)))
                    if all(c in index for c in need):
                        out_cells.append((i, j))
                        out_offsets.append((a, b))
    if not out_cells:
        return plan
    c, o = np.asarray(out_cells, np.int64), np.asarray(out_offsets, np.int64)
    xy = np.rint((c * step + o * stride) * ds).astype(np.int64)
    return OverlapPlan(c, o, xy, stride, step, size, index)


class _Rows:
    """Store patches of a few grid rows, loaded a row at a time and dropped once passed."""

    def __init__(self, imgs: Any, plan: OverlapPlan) -> None:
        self.imgs, self.plan = imgs, plan
        by_row: dict[int, list[tuple[int, int]]] = {}
        for (i, j), n in plan.index.items():
            by_row.setdefault(j, []).append((n, i))
        self.by_row = {j: sorted(v) for j, v in by_row.items()}
        self.loaded: dict[int, dict[int, np.ndarray]] = {}

    def patch(self, i: int, j: int) -> np.ndarray:
        if j not in self.loaded:
            entries = self.by_row[j]
            idx = np.array([n for n, _ in entries], np.int64)
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if hi - lo <= 2 * len(idx):  # one slice, as in the stitcher
                data = np.asarray(self.imgs[lo:hi])[idx - lo]
            else:
                data = np.asarray(self.imgs[idx])
            self.loaded[j] = {col: data[k] for k, (_, col) in enumerate(entries)}
        return self.loaded[j][i]

    def drop_before(self, j: int) -> None:
        for r in [r for r in self.loaded if r < j]:
            del self.loaded[r]


def overlap_patches(imgs: Any, plan: OverlapPlan, batch_size: int) -> Iterator[np.ndarray]:
    """Batches (B, P, P, 3) uint8 of the extra patches, in plan order, cut from the store's ``imgs``."""
    rows = _Rows(imgs, plan)
    p, step, s = plan.patch_size, plan.step, plan.stride
    batch: list[np.ndarray] = []
    for (i, j), (a, b) in zip(plan.cells.tolist(), plan.offsets.tolist(), strict=True):
        rows.drop_before(j)
        nx, ny = plan.span(a), plan.span(b)
        mosaic = np.empty(((ny - 1) * step + p, (nx - 1) * step + p, 3), np.uint8)
        for dy in range(ny):
            for dx in range(nx):
                mosaic[dy * step : dy * step + p, dx * step : dx * step + p] = rows.patch(i + dx, j + dy)
        batch.append(mosaic[b * s : b * s + p, a * s : a * s + p])
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
