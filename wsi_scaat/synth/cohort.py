"""Synthetic slides with ground-truth lesion annotations, and small labelled cohorts.

Geometry (tissue islands and lesions) is generated here as shapely polygons snapped to a
0.01 px grid; the pixels are painted by :mod:`wsi_scaat.synth.render` from exactly these
polygons, so an annotation polygon is the exact ground truth of the lesion texture.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from wsi_scaat.atomic import write_text
from wsi_scaat.synth.geometry import GRID, _blob, _polygons, _random_point, _snap  # noqa: F401
from wsi_scaat.synth.hard import HardPainter, hard_lesion_geometry
from wsi_scaat.synth.render import StripPainter, build_textures, stain_field
from wsi_scaat.synth.tiff import write_pyramid

SPLITS = ("train", "val", "test")
DIFFICULTIES = ("easy", "hard")
Difficulty = Literal["easy", "hard"]
# make_cohort settings that ensure_cohort leaves out of synth.json at these values, so that a cohort
# recorded before they existed stays up to date
JPEG_QUALITY = {"easy": 85, "hard": 95}  # default JPEG quality of each preset
UNRECORDED_DEFAULTS = {"difficulty": "easy", "split_fractions": [0.6, 0.2, 0.2]}
MANIFEST_COLUMNS = ("slide_id", "path", "split", "label", "annotations", "mpp")


def _seq(seed: int, *tags: int) -> np.random.SeedSequence:
    """Seed sequence of an arbitrary (also negative) integer seed and stream tags."""
    return np.random.SeedSequence([int(seed) % 2**64, *tags])


def tissue_geometry(rng: np.random.Generator, width: int, height: int) -> list[Polygon]:
    """1-4 irregular tissue islands covering roughly 30-60% of the slide."""
    n = int(rng.integers(1, 5))
    nx, ny = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2)}[n]
    if height > width:
        nx, ny = ny, nx
    cw, ch = width / nx, height / ny
    parts = []
    for j in range(ny):
        for i in range(nx):
            s = rng.uniform(0.72, 0.88) / 2
            cx = (i + 0.5 + rng.uniform(-0.05, 0.05)) * cw
            cy = (j + 0.5 + rng.uniform(-0.05, 0.05)) * ch
            parts.append(_blob(rng, cx, cy, s * cw, s * ch))
    return _snap(shapely.union_all(parts).intersection(box(0, 0, width, height)))


def lesion_geometry(rng: np.random.Generator, tissue: Sequence[Polygon]) -> list[Polygon]:
    """1-3 blobs inside the tissue covering roughly 5-25% of its area (at least one polygon)."""
    t = shapely.union_all(list(tissue))
    n, frac = int(rng.integers(1, 4)), rng.uniform(0.09, 0.2)
    blobs = []
    for _ in range(n):
        radius = math.sqrt(frac * t.area / n * rng.uniform(0.7, 1.3) / math.pi)
        inner = t.buffer(-0.5 * radius)
        cx, cy = _random_point(rng, t if inner.is_empty else inner)
        e = math.sqrt(rng.uniform(1.0, 1.6))
        blobs.append(_blob(rng, cx, cy, radius * e, radius / e, angle=rng.uniform(0, np.pi), amp=0.15))
    polys = _snap(shapely.union_all(blobs).intersection(t))
    if not polys:  # degenerate (tiny) tissue: fall back to one small disc
        p = t.representative_point()
        polys = _snap(p.buffer(max(2.0, math.sqrt(t.area * 0.1 / math.pi))).intersection(t))
    return polys


def slide_geometry(
    width: int,
    height: int,
    seed: int,
    *,
    lesions: bool = True,
    difficulty: Difficulty = "easy",
    mpp: float = 0.5,
) -> tuple[list[Polygon], list[Polygon]]:
    """(tissue polygons, lesion polygons) of the slide ``make_slide`` draws for this seed.

    The tissue does not depend on ``lesions`` nor on ``difficulty``; lesion polygons lie inside
    the tissue (``mpp`` sizes the hard preset's small foci).
    """
    rng = np.random.default_rng(_seq(seed, 0x6E0))
    tissue = tissue_geometry(rng, width, height)
    if not lesions:
        return tissue, []
    if difficulty == "hard":
        return tissue, hard_lesion_geometry(rng, tissue, mpp)
    return tissue, lesion_geometry(rng, tissue)


def make_slide(
    path: Path,
    width: int,
    height: int,
    seed: int,
    *,
    mpp: float = 0.5,
    lesions: bool = True,
    tile_size: int = 256,
    jpeg_quality: int | None = None,
    difficulty: Difficulty = "easy",
) -> list[Polygon]:
    """Write one pyramidal tiled JPEG TIFF; return lesion polygons in level-0 pixel coords.

    The result is a deterministic function of the arguments (byte-identical files for the
    same seed). Returns an empty list if ``lesions`` is False. ``difficulty`` "easy": lesions
    are dense dark regions; "hard": they differ from normal tissue in nuclear morphology only
    (:mod:`wsi_scaat.synth.hard`). ``jpeg_quality`` None: the preset's (``JPEG_QUALITY``).
    """
    if width < 16 or height < 16:
        raise ValueError(f"slide too small: {width}x{height}")
    if tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    jpeg_quality = JPEG_QUALITY[difficulty] if jpeg_quality is None else jpeg_quality
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    tissue, lesion_polys = slide_geometry(
        width, height, seed, lesions=lesions, difficulty=difficulty, mpp=mpp
    )
    if difficulty == "hard":
        painter = HardPainter(width, height, tissue, lesion_polys, seed, mpp)
        # full-resolution chroma and a high quality: JPEG's 2 x 2 chroma subsampling and coarse
        # quantisation shift the mean colour of patches with many small nuclei against those with
        # few large ones (a colour cue between the classes)
        write_pyramid(
            Path(path),
            width,
            height,
            painter,
            mpp=mpp,
            tile=tile_size,
            quality=jpeg_quality,
            subsampling=(1, 1),
        )
        return lesion_polys
    tex_seed, stain_seed = (int(v) for v in _seq(seed, 0x7E8).generate_state(2))
    textures = build_textures(tex_seed, lesion=bool(lesion_polys))
    stain = stain_field(stain_seed, width, height)
    painter = StripPainter(width, height, tissue, lesion_polys, textures, stain)
    write_pyramid(Path(path), width, height, painter, mpp=mpp, tile=tile_size, quality=jpeg_quality)
    return lesion_polys


def _ring(coords: Iterable) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y, *_ in coords]


def write_annotations(
    path: Path, polygons: Sequence[Polygon], name: str = "lesion", color: Sequence[int] = (255, 0, 0)
) -> None:
    """Write polygons as a QuPath-style GeoJSON FeatureCollection (level-0 pixel coords).

    Coordinates are rounded to 0.01 px; the output is byte-stable for the same input.
    MultiPolygons are written as MultiPolygon features.
    """
    features = []
    for poly in polygons:
        if isinstance(poly, MultiPolygon):
            geometry = {
                "type": "MultiPolygon",
                "coordinates": [
                    [_ring(p.exterior.coords), *(_ring(r.coords) for r in p.interiors)] for p in poly.geoms
                ],
            }
        else:
            geometry = {
                "type": "Polygon",
                "coordinates": [_ring(poly.exterior.coords), *(_ring(r.coords) for r in poly.interiors)],
            }
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [int(c) for c in color]},
                },
            }
        )
    text = json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))
    write_text(path, text + "\n")


def _split_counts(n: int, fractions: Sequence[float], minimum: int) -> list[int]:
    f = np.asarray(fractions, float)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"split_fractions must be 3 non-negative numbers, got {fractions}")
    raw = f / f.sum() * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    for s in np.flatnonzero(f > 0):  # every used split gets >= minimum slides if possible
        while counts[s] < minimum:
            donor = int(np.argmax(counts))
            if counts[donor] <= minimum:
                break
            counts[donor] -= 1
            counts[s] += 1
    return counts.tolist()


def assign_splits(
    n: int, n_lesion: int, fractions: Sequence[float], rng: np.random.Generator
) -> tuple[list[int], list[str]]:
    """Deterministic labels and splits; mixes both labels into every split when possible."""
    n0 = n - n_lesion
    counts = _split_counts(n, fractions, 2 if n >= 6 else (1 if n >= 3 else 0))
    used = [s for s in range(3) if counts[s] > 0]
    mix = all(counts[s] >= 2 for s in used) and min(n_lesion, n0) >= len(used)
    lo = [1 if mix and s in used else 0 for s in range(3)]
    hi = [counts[s] - lo[s] for s in range(3)]
    per = lo.copy()
    for _ in range(n_lesion - sum(lo)):  # distribute lesion slides proportionally
        s = max((s for s in range(3) if per[s] < hi[s]), key=lambda s: n_lesion * counts[s] / n - per[s])
        per[s] += 1
    labels = np.zeros(n, int)
    labels[rng.permutation(n)[:n_lesion]] = 1
    pools = {
        lab: list(
            rng.permutation(
                [SPLITS[s] for s in range(3) for _ in range(per[s] if lab else counts[s] - per[s])]
            )
        )
        for lab in (1, 0)
    }
    splits = [str(pools[int(lab)].pop()) for lab in labels]
    return labels.tolist(), splits


def cohort_plan(
    n_slides: int, seed: int, lesion_slide_fraction: float, split_fractions: Sequence[float]
) -> tuple[list[int], list[str]]:
    """Label and split of every slide of the cohort ``make_cohort`` writes with these settings."""
    rng = np.random.default_rng(_seq(seed, 0xC047))
    return assign_splits(n_slides, int(round(n_slides * lesion_slide_fraction)), split_fractions, rng)


def make_cohort(
    out: Path,
    n_slides: int,
    width: int,
    height: int,
    seed: int,
    *,
    mpp: float = 0.5,
    lesion_slide_fraction: float = 0.5,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    jpeg_quality: int | None = None,
    difficulty: Difficulty = "easy",
) -> Path:
    """Writes out/slides/<slide_id>.tiff, out/annotations/<slide_id>.geojson, out/manifest.csv.

    Returns the manifest path; manifest paths are relative to its folder. ``difficulty``: see
    ``make_slide``.
    """
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if not 0 <= lesion_slide_fraction <= 1:
        raise ValueError(f"lesion_slide_fraction must be in [0, 1], got {lesion_slide_fraction}")
    out = Path(out)
    labels, splits = cohort_plan(n_slides, seed, lesion_slide_fraction, split_fractions)
    digits = max(3, len(str(n_slides - 1)))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for i, (label, split) in enumerate(zip(labels, splits, strict=True)):
        slide_id = f"synth_{i:0{digits}d}"
        slide_seed = int(_seq(seed, i).generate_state(1)[0])
        rel_slide, rel_ann = f"slides/{slide_id}.tiff", f"annotations/{slide_id}.geojson"
        polys = make_slide(
            out / rel_slide,
            width,
            height,
            slide_seed,
            mpp=mpp,
            lesions=bool(label),
            jpeg_quality=jpeg_quality,
            difficulty=difficulty,
        )
        write_annotations(out / rel_ann, polys)
        writer.writerow([slide_id, rel_slide, split, int(bool(polys)), rel_ann, repr(float(mpp))])
    manifest = out / "manifest.csv"
    write_text(manifest, buf.getvalue())
    return manifest


def ensure_cohort(
    out: Path, n_slides: int, width: int, height: int, seed: int, **kwargs
) -> tuple[Path, bool]:
    """``make_cohort`` unless ``out`` already holds a cohort made with the same settings.

    The settings are recorded in ``out/synth.json`` (written last), so an interrupted generation
    is redone. Returns the manifest path and whether the cohort was (re)generated.
    """
    out = Path(out)
    settings = {"n_slides": n_slides, "width": width, "height": height, "seed": seed}
    for key, value in kwargs.items():  # settings at their default are not recorded (older records)
        value = [float(v) for v in value] if key == "split_fractions" else value
        if UNRECORDED_DEFAULTS.get(key, object()) != value:
            settings[key] = value
    record, manifest = out / "synth.json", out / "manifest.csv"
    if manifest.is_file() and record.is_file():
        try:
            if json.loads(record.read_text(encoding="utf-8")) == settings:
                return manifest, False
        except ValueError:
            pass
    record.unlink(missing_ok=True)
    manifest = make_cohort(out, n_slides, width, height, seed, **kwargs)
    write_text(record, json.dumps(settings, sort_keys=True) + "\n")
    return manifest, True
