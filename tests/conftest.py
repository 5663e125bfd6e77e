"""Shared fixtures: the real test slides (skipped when absent) and small synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]


def _slides_dir() -> Path:
    return Path(os.environ.get("WSI_SCAAT_TEST_SLIDES", REPO.parent / "shared" / "slides"))


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """Folder of the real slides; tests using it skip with a reason when it is absent."""
    path = _slides_dir()
    if not (path / "cmu-1-small-region.svs").is_file():
        pytest.skip(f"real test slides not found at {path} (set WSI_SCAAT_TEST_SLIDES)")
    return path


@pytest.fixture(scope="session")
def cmu_slide(slides_dir: Path) -> Path:
    return slides_dir / "cmu-1-small-region.svs"


@pytest.fixture(scope="session")
def synth_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2048 x 1536 synthetic lesion slide and its annotations (made once per session)."""
    from wsi_scaat.synth import make_slide, write_annotations

    folder = tmp_path_factory.mktemp("synth")
    slide = folder / "lesion slide.tiff"
    polygons = make_slide(slide, 2048, 1536, seed=3, mpp=0.5, lesions=True)
    ann = folder / "lesion slide.geojson"
    write_annotations(ann, polygons)
    return slide, ann


def write_plain_tiff(path: Path, image: np.ndarray, mpp: float | None) -> Path:
    """A non-pyramidal, strip-based TIFF (OpenSlide refuses it; tiatoolbox reads it)."""
    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=64, **kwargs)
    return path
