"""Shared fixtures: the real test slides (skipped when absent) and small synthetic slides."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four synthetic slides tiled into 32-px stores at 2 mpp; returns a config dict."""
    import csv

    from wsi_scaat.slides.tiling import TileParams, tile_slide
    from wsi_scaat.synth import make_cohort

    root = tmp_path_factory.mktemp("tiny")
    manifest = make_cohort(root / "data", 4, 1024, 1024, seed=11)
    tiles = root / "results" / "tiny" / "tiles"
    params = TileParams(patch_size=32, target_mpp=2.0, min_tissue=0.3)
    for row in csv.DictReader(manifest.open()):
        ann = root / "data" / row["annotations"]
        tile_slide(root / "data" / row["path"], tiles, params, slide_id=row["slide_id"], annotations=ann,
                   progress=False)  # fmt: skip
    return {
        "cohort": {"name": "tiny", "manifest": str(manifest)},
        "results_dir": str(root / "results"),
        "tiling": {"patch_size": 32, "target_mpp": 2.0},
        "train": {"device": "cpu", "epochs": 3, "batch_size": 16, "lr": 0.003,
                  "model": {"name": "small_cnn", "width": 8}, "augment": {"color_jitter": 0.05},
                  "scaat": {"warmup_epochs": 1}},
    }  # fmt: skip


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained for one epoch on the tiny cohort (its best.pt)."""
    from wsi_scaat.config import validate_config
    from wsi_scaat.training.trainer import fit

    cfg = validate_config({**tiny_cohort, "train": {**tiny_cohort["train"], "epochs": 1}})
    out = tmp_path_factory.mktemp("tiny_model")
    fit(cfg, "erm", out, log=lambda _: None)
    return out / "best.pt"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread is faster, and immune to a busy shared machine; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
