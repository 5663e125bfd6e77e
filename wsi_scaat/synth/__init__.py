"""Deterministic synthetic H&E-like whole-slide images with ground-truth lesion annotations."""

from wsi_scaat.annotations import read_annotations
from wsi_scaat.synth.cohort import (
    MANIFEST_COLUMNS,
    SPLITS,
    ensure_cohort,
    make_cohort,
    make_slide,
    write_annotations,
)
from wsi_scaat.synth.render import rasterize

__all__ = [
    "MANIFEST_COLUMNS",
    "SPLITS",
    "ensure_cohort",
    "make_cohort",
    "make_slide",
    "rasterize",
    "read_annotations",
    "write_annotations",
]
