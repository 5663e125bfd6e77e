"""Cohort manifests: ``slide_id,path,split,label,annotations[,mpp]`` with paths relative to the CSV."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from wsi_scaat.errors import WsiScaatError

REQUIRED_COLUMNS = ("slide_id", "path", "split", "label", "annotations")
SPLITS = ("train", "val", "test", "")


class ManifestError(WsiScaatError):
    """The manifest is missing or malformed."""


@dataclass(frozen=True)
class SlideEntry:
    """One row of a manifest, paths resolved against the manifest's folder."""

    slide_id: str
    path: Path
    split: str
    label: int | None
    annotations: Path | None
    mpp: float | None


def check_slide_id(slide_id: str) -> str:
    """A slide id that is safe as a file name: no separators, no leading dot, no control characters.

    Nor braces: the workflow's file patterns would read ``{...}`` as a Snakemake wildcard.
    """
    bad = (
        not slide_id
        or slide_id.startswith(".")
        or any(c in slide_id for c in "/\\\0")
        or any(ord(c) < 32 for c in slide_id)
        or slide_id != slide_id.strip()
    )
    if bad:
        raise ValueError(f"unsafe slide_id {slide_id!r} (it names output files)")
    if any(c in slide_id for c in "{}"):
        raise ValueError(f"slide_id {slide_id!r} holds '{{' or '}}' (Snakemake reads braces as wildcards)")
    return slide_id


def _opt_float(value: str) -> float | None:
    if value is None or not value.strip():
        return None
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"mpp must be a positive number, got {value!r}")
    return out


def read_manifest(path: str | Path) -> list[SlideEntry]:
    """Read and validate a manifest; every problem raises ``ManifestError`` naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found (generate one with `wsi-scaat synth` or write it)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(path, f"missing columns {missing}; need {list(REQUIRED_COLUMNS)}")
        entries, seen = [], set()
        for row_no, row in enumerate(reader, start=2):
            try:
                slide_id = check_slide_id(row["slide_id"])
                if slide_id in seen:
                    raise ValueError(f"duplicate slide_id {slide_id!r}")
                seen.add(slide_id)
                split = (row["split"] or "").strip()
                if split not in SPLITS:
                    raise ValueError(f"split must be one of train/val/test, got {split!r}")
                label = int(row["label"]) if (row["label"] or "").strip() else None
                ann = (row["annotations"] or "").strip()
                entries.append(
                    SlideEntry(
                        slide_id=slide_id,
                        path=(path.parent / row["path"]).resolve(),
                        split=split,
                        label=label,
                        annotations=(path.parent / ann).resolve() if ann else None,
                        mpp=_opt_float(row.get("mpp") or ""),
                    )
                )
            except (ValueError, TypeError) as exc:
                raise ManifestError(path, f"row {row_no}: {exc}") from None
    return entries
