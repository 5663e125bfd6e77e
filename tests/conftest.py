"""Shared fixtures: the real test slides (skipped when absent) and small synthetic slides."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
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


QUPATH_TOOL = REPO.parent / "shared" / "tools" / "qupath-geojson"
QUPATH_JARS = ("gson.jar", "jts-core.jar", "slf4j-api.jar")  # Debian's, in /usr/share/java
QUPATH_SETUP = (
    ".ci/run installs them as root (apt-get install openjdk-17-jre-headless libgson-java libjts-java "
    "libslf4j-java groovy)"
)


def _java_major() -> int | None:
    """Major version of ``java`` on the PATH, or None without one."""
    if shutil.which("java") is None:
        return None
    out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60).stderr
    found = re.search(r'version "(?:1\.)?(\d+)', out)
    return int(found.group(1)) if found else None


@pytest.fixture(scope="session")
def qupath_core() -> str:
    """Java classpath of qupath-core 0.5.1 (``../shared/tools/qupath-geojson``) and the jars it needs.

    Skips with the reason when the tool, Java 17 or the jars are absent.
    """
    jar = QUPATH_TOOL / "qupath-core-0.5.1.jar"
    if not jar.is_file():
        pytest.skip(f"QuPath's core library not found at {jar}")
    major = _java_major()
    if major is None or major < 17:
        have = "no java on the PATH" if major is None else f"java {major}"
        pytest.skip(f"QuPath's code needs Java 17 ({have}); {QUPATH_SETUP}")
    missing = [j for j in QUPATH_JARS if not (Path("/usr/share/java") / j).is_file()]
    if missing:
        pytest.skip(f"QuPath's code needs {missing} in /usr/share/java; {QUPATH_SETUP}")
    return os.pathsep.join([str(QUPATH_TOOL), str(jar), *(f"/usr/share/java/{j}" for j in QUPATH_JARS)])


@pytest.fixture(scope="session")
def qupath_read(qupath_core: str) -> Callable[..., list[dict]]:
    """``read(*paths)``: what QuPath makes of GeoJSON files, one dict per file, in order.

    Runs ``../shared/tools/qupath-geojson/qupath-read`` (qupath-core 0.5.1's ``PathIO.readObjects``
    and ``PathObjectHierarchy``); keys ``file``, ``objects``, ``types``, ``classes``
    ("name #rrggbb"), ``locked``, ``named``, ``measurements``, ``in_hierarchy``, ``first_bounds``,
    or ``file`` and ``error`` when QuPath refuses the file.
    """

    def read(*paths: Path) -> list[dict]:
        cmd = [str(QUPATH_TOOL / "qupath-read"), *map(str, paths)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode not in (0, 1) or len(lines) != len(paths):
            raise RuntimeError(f"qupath-read failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
        return lines

    return read


@pytest.fixture(scope="session")
def qupath_groovy(qupath_core: str) -> Callable[..., subprocess.CompletedProcess]:
    """``run(script, *args)``: a Groovy script run with qupath-core on the classpath (Groovy >= 2.4).

    With Debian's ``slf4j-simple.jar`` QuPath's log (its deprecation warnings included) goes to stderr.
    """
    groovy = shutil.which("groovy")
    if groovy is None:
        pytest.skip(f"groovy not found; {QUPATH_SETUP}")
    java = Path(os.path.realpath(shutil.which("java") or "java"))
    env = {**os.environ, "JAVA_HOME": str(java.parents[1])}  # Debian's groovy wants it
    logger = Path("/usr/share/java/slf4j-simple.jar")  # QuPath's warnings to stderr (libslf4j-java)
    classpath = os.pathsep.join([qupath_core, str(logger)]) if logger.is_file() else qupath_core

    def run(script: Path, *args: object) -> subprocess.CompletedProcess:
        cmd = [groovy, "-cp", classpath, str(script), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    probe = subprocess.run(
        [groovy, "-e", "print 6 * 7"], capture_output=True, text=True, timeout=600, env=env
    )
    if probe.stdout != "42":
        pytest.skip(f"groovy does not run with {java}: {probe.stderr.strip()[-300:]}")

    return run


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
