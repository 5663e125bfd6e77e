"""Hostile inputs: every bad file fails alone with a one-line reason; the good slides complete.

The bad files: the shared broken / unopenable / unreadable-mid-read slides, a zero-byte file, a
truncated slide, a text file named ``.svs``, a slide without mpp, a TIFF whose header claims
10^6 x 10^6 px, and a manifest row whose file does not exist. The good slides include a file
name with spaces and non-ASCII characters, annotated with a self-intersecting (bow-tie) polygon.
"""

from __future__ import annotations

import csv
import json
import resource
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
import yaml
from shapely.geometry import Polygon

from wsi_scaat.annotations import coverage_fraction, read_annotations
from wsi_scaat.store import open_store

from conftest import REPO, write_plain_tiff

SIDE = 10**6
#: The bow-tie in level-0 pixels of a 1024 x 1024 slide: two triangles meeting at (512, 512).
BOWTIE = [(128, 128), (896, 896), (896, 128), (128, 896), (128, 128)]
#: Expected cause (a fragment of the one-line reason) of each bad slide.
CAUSES = {
    "broken": "cannot open as a slide",
    "unopenable": "cannot read pixels",
    "unreadable": "cannot read pixels",
    "zero": "empty file (0 bytes)",
    "truncated": "cannot read pixels",
    "text": "cannot open as a slide",
    "nompp": "microns-per-pixel unknown",
    "huge": f"header claims {SIDE} x {SIDE} px",
    "missing": "file not found",
}
GOOD = ("plain", "lésion 01 (copy)")


def write_huge_tiff(path: Path, tile: int | None = 65536) -> Path:
    """A ~2 kB RGB TIFF whose header claims 10^6 x 10^6 px (tiled, or one strip when ``tile`` is None).

    Written tag by tag: the tile offsets all point to nothing, so any reader that believed the
    header and allocated the image would need terabytes.
    """
    tags: list[tuple[int, int, list[int]]] = [
        (256, 4, [SIDE]), (257, 4, [SIDE]), (258, 3, [8, 8, 8]), (259, 3, [1]), (262, 3, [2]),
        (277, 3, [3]), (284, 3, [1]),
    ]  # fmt: skip
    if tile:
        n = (-(-SIDE // tile)) ** 2
        tags += [(322, 4, [tile]), (323, 4, [tile]), (324, 4, [0] * n), (325, 4, [0] * n)]
    else:
        tags += [(273, 4, [0]), (278, 4, [SIDE]), (279, 4, [0])]
    tags.sort()
    extra_at = 8 + 2 + 12 * len(tags) + 4
    ifd, extra = struct.pack("<H", len(tags)), b""
    for tag, kind, values in tags:
        data = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(data) <= 4:
            value = data.ljust(4, b"\0")
        else:
            value, extra = struct.pack("<I", extra_at + len(extra)), extra + data
        ifd += struct.pack("<HHI", tag, kind, len(values)) + value
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra)
    return path


def write_bowtie(path: Path) -> Path:
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in BOWTIE]]},
        "properties": {"objectType": "annotation", "classification": {"name": "lesion"}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cohort(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path | None]]:
    """slide_id -> (slide path, annotations) of good synthetic slides and every hostile file."""
    from wsi_scaat.synth import make_cohort

    root = tmp_path_factory.mktemp("hostile")
    make_cohort(root / "synth", 2, 1024, 1024, seed=5)
    data = root / "data"
    data.mkdir()
    plain = shutil.copy(root / "synth/slides/synth_000.tiff", data / "plain.tiff")
    odd = shutil.copy(root / "synth/slides/synth_001.tiff", data / "lésion 01 (copy).tiff")
    good = root / "synth/slides/synth_000.tiff"
    truncated = data / "truncated.tiff"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (data / "zero.svs").touch()
    (data / "text.svs").write_text("slide_id,path\nthis is not a slide\n", encoding="utf-8")
    nompp = write_plain_tiff(data / "nompp.tiff", np.full((512, 512, 3), 180, np.uint8), mpp=None)
    return {
        "plain": (Path(plain), root / "synth/annotations/synth_000.geojson"),
        "lésion 01 (copy)": (Path(odd), write_bowtie(data / "lésion 01 (copy).geojson")),
        "broken": (slides_dir / "broken.svs", None),
        "unopenable": (slides_dir / "openslide-unopenable.tiff", None),
        "unreadable": (slides_dir / "openslide-unreadable.svs", None),
        "zero": (data / "zero.svs", None),
        "truncated": (truncated, None),
        "text": (data / "text.svs", None),
        "nompp": (nompp, None),
        "huge": (write_huge_tiff(data / "huge.tiff"), None),
        "missing": (data / "not here.svs", None),
    }


def _limit_memory() -> None:  # a reader that believed the 10^12-px header would fail, not swap
    resource.setrlimit(resource.RLIMIT_AS, (4 * 1024**3, 4 * 1024**3))


@pytest.mark.parametrize("sid", sorted(CAUSES))
def test_each_bad_slide_fails_alone_in_one_line(
    cohort: dict[str, tuple[Path, Path | None]], sid: str, tmp_path: Path
) -> None:
    slide, out = cohort[sid][0], tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_scaat", "tile", str(slide), "--out", str(out), "--no-progress",
           "--patch-size", "32", "--target-mpp", "2"]  # fmt: skip
    limit = _limit_memory if sid == "huge" else None
    run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    assert run.returncode == 1
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("wsi-scaat: error: ") and slide.name in line and CAUSES[sid] in line, line
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("tile", [65536, None], ids=["tiled", "strip"])
def test_huge_header_is_refused_by_both_readers(
    tmp_path: Path, tile: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_scaat.errors import SlideOpenError
    from wsi_scaat.slides import open_slide
    from wsi_scaat.slides.openslide_backend import OpenSlideReader

    path = write_huge_tiff(tmp_path / "huge.tiff", tile)
    assert path.stat().st_size < 4096
    with pytest.raises(SlideOpenError, match=f"huge.tiff: .*{SIDE} x {SIDE} px"):
        open_slide(path)

    def refuse(self: OpenSlideReader, path: Path) -> None:
        raise RuntimeError("Unsupported or missing image file")

    monkeypatch.setattr(OpenSlideReader, "__init__", refuse)  # the tiatoolbox fallback alone
    with pytest.raises(SlideOpenError, match=f"huge.tiff: .*{SIDE} x {SIDE} px"):
        open_slide(path)


def test_slides_without_patches_fail_clearly(slides_dir: Path, tmp_path: Path) -> None:
    from wsi_scaat.errors import WsiScaatError
    from wsi_scaat.slides.tiling import TileParams, tile_slide

    blank = write_plain_tiff(tmp_path / "blank.tiff", np.full((512, 512, 3), 255, np.uint8), mpp=0.5)
    cases = [
        (blank, r"blank.tiff: no tissue detected \(tissue.min_area_um2=1000"),
        (slides_dir / "openslide-small.svs", r"small.svs: no patches: the slide \(16 x 16 px\) is smaller"),
        (slides_dir / "openslide-boxes.tiff", r"boxes.tiff: level-0 mpp 352.* less than one pixel"),  # 72 dpi
    ]
    for slide, message in cases:
        with pytest.raises(WsiScaatError, match=message):
            tile_slide(slide, tmp_path / "out", TileParams(patch_size=64), progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_bowtie_is_repaired_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"bowtie.geojson: feature 0 is invalid .*make_valid"):
        polygons = read_annotations(write_bowtie(tmp_path / "bowtie.geojson"))
    assert len(polygons) == 2 and all(p.is_valid for p in polygons)  # both lobes, not one
    assert sum(p.area for p in polygons) == pytest.approx(2 * 768 * 384 / 2)


def _snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd)


def _expected_labels(coords: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        repaired = shapely.make_valid(Polygon(BOWTIE))
    return (coverage_fraction([repaired], coords, 128) >= 0.5).astype(int)


def test_hostile_cohort_keep_going(
    cohort: dict[str, tuple[Path, Path | None]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from wsi_scaat.training.checkpoint import load_checkpoint

    state = load_checkpoint(tiny_checkpoint)
    assert state["patch_size"] == 32 and state["patch_mpp"] == pytest.approx(2.0)
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "path", "split", "label", "annotations", "mpp"])
        for sid, (slide, ann) in cohort.items():
            writer.writerow([sid, slide, "test", "", ann or "", "0.5" if sid in GOOD else ""])
    cfg = {
        "cohort": {"name": "hostile", "manifest": str(manifest)},
        "results_dir": str(tmp_path / "results"),
        "tiling": {"patch_size": 32, "target_mpp": 2.0, "min_tissue": 0.0},
        "model_checkpoint": str(tiny_checkpoint),
        "saliency": {"batch_size": 64},
        "export": {"thumbnail_size": 256},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")

    run = _snakemake("--cores", "2", "--keep-going", "--configfile", str(config), cwd=tmp_path)
    assert run.returncode != 0  # the bad slides failed
    results = tmp_path / "results/hostile"
    export = results / "export/pretrained"
    for sid in GOOD:
        for kind in ("tiles.geojson", "regions.geojson", "overlay.png", "heatmap.ome.tif", "figure.png"):
            assert (export / f"{sid}.{kind}").is_file(), (sid, kind, run.stderr[-3000:])

    with (results / "run_summary.csv").open(newline="", encoding="utf-8") as fh:
        rows = {row["slide_id"]: row for row in csv.DictReader(fh)}
    assert set(rows) == set(CAUSES) | set(GOOD)
    for sid in GOOD:
        assert (rows[sid]["status"], rows[sid]["model"], rows[sid]["reason"]) == ("ok", "pretrained", "")
    for sid, cause in CAUSES.items():
        row = rows[sid]
        assert (row["status"], row["stage"]) == ("failed", "tile"), row
        assert cause in row["reason"] and "\n" not in row["reason"], row
        assert row["path"] == str(cohort[sid][0].resolve())
        assert not list((results / "tiles").glob(f"{sid}.*"))  # nothing half-written
    assert "make_valid" in rows["lésion 01 (copy)"]["warnings"]
    assert "make_valid" in (results / "logs/tile/lésion 01 (copy).log").read_text(encoding="utf-8")

    # The repaired bow-tie labels the patches of both lobes, not the notches between them.
    with open_store(results / "tiles/lésion 01 (copy).h5") as store:
        coords, labels = store.coords[:], store.array("labels")
    np.testing.assert_array_equal(labels, _expected_labels(coords))
    label_at = {(int(x), int(y)): int(v) for (x, y), v in zip(coords, labels, strict=True)}
    assert label_at[(128, 384)] == label_at[(768, 384)] == 1  # left and right lobes
    assert label_at[(384, 128)] == label_at[(384, 768)] == 0  # top and bottom notches

    again = subprocess.run(
        [sys.executable, "-m", "wsi_scaat", "summarize", "--config", str(config)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"({len(CAUSES)} failed, {len(GOOD)} ok)" in again.stdout
