"""Label images to QuPath annotations: one GeoJSON feature per connected region of each class.

A label image (palette or single-channel PNG/TIFF) holds one class value per pixel. Each class's
regions are traced along pixel *edges*, so a region's polygon is exactly the union of its pixel
squares: rasterising the annotations back at pixel centres (as :mod:`wsi_scaat.evaluation.groundtruth`
does) reproduces the mask, and areas (the tiler's lesion fractions) are pixel counts.

Tracing: OpenCV's ``findContours`` (``RETR_CCOMP``: outlines and their holes) runs on a grid of twice
the resolution whose points are pixel corners, edge midpoints and centres; a point is set when it lies
in the closed square of a class pixel. The border of that set runs along pixel edges, except that the
8-connected trace cuts concave corners by one diagonal step, which is replaced by the corner itself.
Regions are 4-connected: pixels touching only at a corner are separate features (``make_valid``
splits an outline that pinches at a corner). Coordinates are level-0 pixels: mask pixel edges times
``downsample`` (the mask may be a downsample of the slide).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
from PIL import Image
from shapely.geometry import Polygon, mapping
from shapely.geometry.polygon import orient

from wsi_scaat.atomic import write_text
from wsi_scaat.errors import WsiScaatError

#: Colours of classes whose label image has no palette (matplotlib's tab10).
DEFAULT_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


class MaskError(WsiScaatError):
    """A label image is unreadable or holds values that no class or ignore entry accounts for."""


@dataclass(frozen=True)
class LabelImage:
    """Class values per pixel and, for palette images, the colour of each value."""

    labels: np.ndarray  # (H, W) integer
    palette: dict[int, tuple[int, int, int]] | None


def parse_classes(text: str) -> dict[int, str]:
    """``"0=tumour,1=stroma"`` as ``{0: "tumour", 1: "stroma"}``; each value and name at most once."""
    out: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise ValueError(f"--classes expects VALUE=NAME pairs separated by commas, got {item!r}")
        value_int, name = int(value), name.strip()
        if value_int in out or name in out.values():
            raise ValueError(f"--classes: value {value_int} or name {name!r} given twice")
        out[value_int] = name
    if not out:
        raise ValueError("--classes is empty; give e.g. 0=tumour,1=stroma")
    return out


def parse_values(items: Iterable[str] | None) -> set[int]:
    """Values given as ``["3", "4,5"]`` (repeated options, each comma-separated) as a set."""
    out = set()
    for part in (p.strip() for item in items or [] for p in str(item).split(",")):
        if part:
            if not part.isdigit():
                raise ValueError(f"expected a label value (a non-negative integer), got {part!r}")
            out.add(int(part))
    return out


def read_label_image(path: str | Path) -> LabelImage:
    """A palette or single-channel PNG/TIFF as class values (and the palette's colours)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                labels, cmap = page.asarray(), page.colormap
            palette = None
            if cmap is not None:
                scale = 257 if cmap.max() > 255 else 1
                palette = {v: tuple(int(c) // scale for c in cmap[:, v]) for v in range(cmap.shape[1])}
        else:
            with Image.open(path) as img:
                img.load()
                mode, labels = img.mode, np.asarray(img)
                flat = img.getpalette() if mode == "P" else None
            palette = (
                None if flat is None else {v: tuple(flat[3 * v : 3 * v + 3]) for v in range(len(flat) // 3)}
            )
            if mode == "1":
                labels = labels.astype(np.uint8)
    except (OSError, ValueError) as exc:
        raise MaskError(path, f"cannot read the label image: {exc}") from None
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise MaskError(path, f"not a label image (palette or single-channel integer); got shape "
                              f"{labels.shape}, type {labels.dtype}")  # fmt: skip
    return LabelImage(labels=labels, palette=palette)


def _corner_steps(chain: np.ndarray) -> np.ndarray:
    """A closed 8-connected chain on the doubled grid with each diagonal step routed through the
    pixel corner (the point with both coordinates odd), then only the points where it turns."""
    nxt = np.roll(chain, -1, axis=0)
    diagonal = np.abs(nxt - chain).min(axis=1) == 1
    corner = np.where((chain[:, :1] % 2 == 1), np.stack([chain[:, 0], nxt[:, 1]], 1),
                      np.stack([nxt[:, 0], chain[:, 1]], 1))  # fmt: skip
    points = np.empty((len(chain) + int(diagonal.sum()), 2), np.int64)
    at = np.arange(len(chain)) + np.concatenate([[0], np.cumsum(diagonal)[:-1]])
    points[at] = chain
    points[at[diagonal] + 1] = corner[diagonal]
    step_in = points - np.roll(points, 1, axis=0)
    step_out = np.roll(points, -1, axis=0) - points
    turns = np.any(step_in != step_out, axis=1)
    return points[turns]


def region_polygons(mask: np.ndarray, downsample: float = 1.0) -> list[Polygon]:
    """The 4-connected regions of a boolean mask as polygons (with holes) along pixel edges.

    Mask pixel (r, c) covers level-0 ``[c D, (c + 1) D) x [r D, (r + 1) D)`` with ``D = downsample``.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, c0 = int(rows[0]), int(cols[0])
    sub = mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1]
    h, w = sub.shape
    # grid point a <-> mask coordinate (a - 1) / 2: corners odd, centres even, a margin of zeros around
    grid = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    grid[2 : 2 * h + 1 : 2, 2 : 2 * w + 1 : 2] = sub
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []

    def ring(k: int) -> np.ndarray:
        points = _corner_steps(contours[k][:, 0, :].astype(np.int64)).astype(np.float64)
        return ((points - 1.0) / 2.0 + (c0, r0)) * float(downsample)

    polygons: list[Polygon] = []
    links = hierarchy[0]
    for k in range(len(contours)):
        if links[k][3] != -1:
            continue  # a hole: attached to its outline below
        holes, child = [], links[k][2]
        while child != -1:
            holes.append(ring(child))
            child = links[child][0]
        geom = shapely.make_valid(Polygon(ring(k), holes))
        parts = geom.geoms if hasattr(geom, "geoms") else [geom]
        polygons.extend(orient(p) for p in parts if isinstance(p, Polygon) and p.area > 0)
    return polygons


def mask_features(
    image: LabelImage,
    classes: Mapping[int, str],
    ignore: Iterable[int] = (),
    downsample: float = 1.0,
    source: str | Path | None = None,
) -> list[dict]:
    """QuPath annotation features of every region of every class of ``classes``.

    Every value of the image must be a key of ``classes`` or in ``ignore``: anything else is an
    error naming the values (``source`` names the file), never skipped in silence.
    """
    if not downsample > 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    ignore = set(ignore)
    both = ignore & set(classes)
    if both:
        raise ValueError(f"values {sorted(both)} are both classes and ignored")
    present = set(np.unique(image.labels).tolist())
    unknown = present - set(classes) - ignore
    if unknown:
        raise MaskError(source, f"values {sorted(unknown)} are neither in --classes "
                                f"({','.join(map(str, sorted(classes)))}) nor in --ignore")  # fmt: skip
    features = []
    for k, (value, name) in enumerate(sorted(classes.items())):
        if value not in present:
            continue
        colour = (image.palette or {}).get(value) or DEFAULT_COLOURS[k % len(DEFAULT_COLOURS)]
        polygons = region_polygons(image.labels == value, downsample)
        for poly in sorted(polygons, key=lambda p: (p.bounds[1], p.bounds[0])):
            features.append({
                "type": "Feature",
                "geometry": mapping(poly),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [int(c) for c in colour]},
                    "isLocked": False,
                },
            })  # fmt: skip
    return features


def masks_to_geojson(
    mask: str | Path,
    out: str | Path,
    classes: Mapping[int, str],
    ignore: Iterable[int] = (),
    downsample: float = 1.0,
) -> dict[str, int]:
    """Write the annotations of a label image to ``out`` (atomically, and only when they changed).

    Returns the number of features per class name.
    """
    features = mask_features(read_label_image(mask), classes, ignore, downsample, source=mask)
    write_if_changed(out, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")
    counts = {name: 0 for name in classes.values()}
    for feat in features:
        counts[feat["properties"]["classification"]["name"]] += 1
    return counts


def write_if_changed(path: str | Path, text: str) -> None:
    """Write ``text`` atomically unless the file already holds it (its time stamp then stays)."""
    path = Path(path)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)
