"""Tests of the hard synthetic preset (``synth.difficulty: hard``; wsi_scaat.synth.hard, .nuclei)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from pydantic import ValidationError
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.morphology import disk

from wsi_scaat.metrics.ranking import auroc
from wsi_scaat.sections import SynthConfig
from wsi_scaat.synth import ensure_cohort, make_cohort, make_slide, rasterize, read_annotations
from wsi_scaat.synth.cohort import slide_geometry, tissue_geometry
from wsi_scaat.synth.hard import (
    MIN_PIECE_UM2,
    HardPainter,
    cellularity_field,
    hard_lesion_geometry,
    ragged_blob,
    slide_stain,
)
from wsi_scaat.synth.nuclei import ATYPICAL, NORMAL_KINDS, prepared, sample_block

openslide = pytest.importorskip("openslide")

MPP = 0.5
PATCH = 96  # level-0 px: a 48-um patch, as the hard config tiles
SIDE = 1024


def _read_rgb(path: Path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[tuple[int, np.ndarray, np.ndarray, list, list]]:
    """Four lesion slides of the hard preset and their lesion-free twins (same seed: same tissue,
    stain, stroma and cellularity): (seed, level-0 RGB, twin's RGB, tissue, lesions)."""
    out = []
    folder = tmp_path_factory.mktemp("hard")
    for seed in range(4):
        lesions = make_slide(folder / f"s{seed}.tiff", SIDE, SIDE, seed, difficulty="hard")
        assert make_slide(folder / f"t{seed}.tiff", SIDE, SIDE, seed, difficulty="hard", lesions=False) == []
        tissue, _ = slide_geometry(SIDE, SIDE, seed, difficulty="hard")
        out.append(
            (seed, _read_rgb(folder / f"s{seed}.tiff"), _read_rgb(folder / f"t{seed}.tiff"), tissue, lesions)
        )
    return out


def _lesion_patches(tissue: list, lesions: list) -> list[tuple[int, int]]:
    """Top-left corners of the patches (half-overlapping grid) wholly inside tissue and lesion."""
    t, les = rasterize(tissue, 0, SIDE, 0, SIDE), rasterize(lesions, 0, SIDE, 0, SIDE)
    inside = t & les
    step = PATCH // 2
    return [
        (y, x)
        for y in range(0, SIDE - PATCH + 1, step)
        for x in range(0, SIDE - PATCH + 1, step)
        if inside[y : y + PATCH, x : x + PATCH].all()
    ]


def _colour(imgs: np.ndarray) -> np.ndarray:
    """Mean R, G, B and H, E, D optical density of each patch."""
    hed = np.stack([rgb2hed(p).reshape(-1, 3).mean(0) for p in imgs])
    return np.c_[imgs.reshape(len(imgs), -1, 3).mean(1) / 255, hed]


def test_same_seed_same_bytes_and_strips_and_chunks_in_any_order(tmp_path):
    a = make_slide(tmp_path / "a.tiff", 640, 512, 5, difficulty="hard")
    b = make_slide(tmp_path / "b.tiff", 640, 512, 5, difficulty="hard")
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()
    assert [p.wkb for p in a] == [p.wkb for p in b]
    make_slide(tmp_path / "c.tiff", 640, 512, 6, difficulty="hard")
    assert (tmp_path / "c.tiff").read_bytes() != (tmp_path / "a.tiff").read_bytes()
    # the easy slide of the same seed is another image with the same tissue
    make_slide(tmp_path / "e.tiff", 640, 512, 5)
    assert (tmp_path / "e.tiff").read_bytes() != (tmp_path / "a.tiff").read_bytes()
    assert slide_geometry(640, 512, 5)[0] == slide_geometry(640, 512, 5, difficulty="hard")[0]
    # a strip painted on its own equals the same rows painted after the strips above it
    tissue, lesions = slide_geometry(640, 512, 5, difficulty="hard")
    whole = HardPainter(640, 512, tissue, lesions, 5, MPP)(0, 512)
    alone = HardPainter(640, 512, tissue, lesions, 5, MPP)(200, 150)
    assert np.array_equal(alone, whole[200:350])
    narrow = HardPainter(640, 512, tissue, lesions, 5, MPP)
    narrow.chunk = 100  # column chunks, as on slides wider than 4096 px
    assert np.array_equal(narrow(0, 512), whole)


def test_hard_cohort_is_deterministic_and_recorded(tmp_path):
    kwargs = {"difficulty": "hard", "split_fractions": (0.5, 0.0, 0.5), "lesion_slide_fraction": 0.5}
    a, made = ensure_cohort(tmp_path / "a", 2, 384, 320, 3, **kwargs)
    assert made
    record = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert record["difficulty"] == "hard" and record["split_fractions"] == [0.5, 0.0, 0.5]
    assert ensure_cohort(tmp_path / "a", 2, 384, 320, 3, **kwargs) == (a, False)
    b = make_cohort(tmp_path / "b", 2, 384, 320, 3, **kwargs)
    for rel in (
        "manifest.csv",
        "slides/synth_000.tiff",
        "slides/synth_001.tiff",
        "annotations/synth_000.geojson",
    ):
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    rows = list(csv.DictReader(a.open()))
    assert sorted(r["split"] for r in rows) == ["test", "train"]
    assert sorted(r["label"] for r in rows) == ["0", "1"]
    # an easy cohort records no difficulty (records made before the setting existed stay valid)
    ensure_cohort(tmp_path / "e", 1, 256, 256, 3)
    assert "difficulty" not in json.loads((tmp_path / "e" / "synth.json").read_text())
    assert ensure_cohort(tmp_path / "e", 1, 256, 256, 3, difficulty="easy")[1] is False
    assert ensure_cohort(tmp_path / "e", 1, 256, 256, 3, difficulty="hard")[1] is True


def test_synth_config_fields():
    cfg = SynthConfig(out="x", difficulty="hard", split_fractions=[0.5, 0.1, 0.4])
    assert cfg.difficulty == "hard" and cfg.split_fractions == (0.5, 0.1, 0.4)
    assert SynthConfig(out="x").difficulty == "easy"
    for bad in (
        {"difficulty": "medium"},
        {"split_fractions": [0.5, -0.1, 0.6]},
        {"split_fractions": [0, 0, 0]},
    ):
        with pytest.raises(ValidationError):
            SynthConfig(out="x", **bad)
    with pytest.raises(ValueError, match="difficulty"):
        make_slide(Path("never.tiff"), 256, 256, 0, difficulty="medium")  # type: ignore[arg-type]


def test_lesions_of_every_size_with_ragged_borders():
    patch_area = PATCH * PATCH
    sizes, ragged = [], []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        tissue = tissue_geometry(rng, 2048, 2048)
        lesions = hard_lesion_geometry(rng, tissue, MPP)
        t = shapely.union_all(tissue)
        assert all(p.is_valid and t.buffer(0.02).contains(p) for p in lesions)
        areas = sorted(p.area / patch_area for p in lesions)
        assert any(1 <= a <= 7 for a in areas), areas  # small foci of a few patches
        assert areas[-1] >= 12, areas  # and larger regions
        sizes += areas
    assert min(sizes) * patch_area * MPP**2 >= MIN_PIECE_UM2 and max(sizes) > 60  # no slivers
    for seed in range(20):  # outlines are ragged: perimeter well above a disc's of the same area
        blob = ragged_blob(np.random.default_rng(seed), 0, 0, 40 + 20 * seed, n=128 if seed < 5 else 256)
        assert blob.is_valid
        ragged.append(blob.length / (2 * math.sqrt(math.pi * blob.area)))
    assert min(ragged) > 1.3, ragged


def test_nuclei_differ_in_morphology_not_in_amount():
    """Same nuclear area per tissue area in both classes; lesion nuclei larger, fewer, irregular."""
    block, n_blocks, stats = 96, 300, {}
    cellularity = cellularity_field(np.random.default_rng(0), 30, 10).ravel()
    everywhere = prepared([shapely.box(-1e4, -1e4, 1e4, 1e4)])
    for name, lesions in (("normal", None), ("lesion", everywhere)):
        area, count, radius, irregular = [], [], [], []
        for i in range(n_blocks):
            rng = np.random.default_rng(i)
            nuclei = sample_block(rng, 0, 0, block, cellularity[i], None, lesions, 0.75, MPP)
            area.append((math.pi * nuclei.radius**2).sum() / block**2 / cellularity[i])
            count.append(len(nuclei) / (block * MPP) ** 2)
            radius += list(nuclei.radius * MPP)
            irregular += list(nuclei.harm_amp[:, :3].sum(1))
        stats[name] = np.array(area), np.array(count), np.array(radius), np.array(irregular)
    (a0, n0, r0, i0), (a1, n1, r1, i1) = stats["normal"], stats["lesion"]
    assert abs(a0.mean() - 1) < 0.03 and abs(a1.mean() - 1) < 0.03  # area fraction = cellularity
    assert 0.35 < auroc(np.r_[a0, a1], np.r_[np.zeros(n_blocks), np.ones(n_blocks)]) < 0.65
    assert np.mean(np.pi * r1**2) > 1.8 * np.mean(np.pi * r0**2)
    assert np.mean(i1) > 2 * np.mean(i0)
    # fewer nuclei per area in lesions, but the densities of the two classes overlap
    assert n1.mean() < n0.mean() and np.percentile(n1, 90) > np.percentile(n0, 10)
    assert ATYPICAL.radius[0] < max(k.radius[1] for _, k in NORMAL_KINDS) + 0.5  # sizes nearly touch


def test_colour_does_not_separate_the_classes(slides):
    """The same patches rendered with and without the lesion have the same mean colour.

    The twin slide has the lesion's nuclei drawn as normal ones (same stain, stroma, cellularity):
    a paired comparison, free of the slide-to-slide and place-to-place variation of the stain.
    """
    lesion, twin, slide_means = [], [], []
    for _, rgb, rgb_twin, tissue, lesions in slides:
        corners = _lesion_patches(tissue, lesions)
        lesion.append(_colour(np.array([rgb[y : y + PATCH, x : x + PATCH] for y, x in corners])))
        twin.append(_colour(np.array([rgb_twin[y : y + PATCH, x : x + PATCH] for y, x in corners])))
        slide_means.append(twin[-1].mean(0))
    a, b = np.concatenate(lesion), np.concatenate(twin)
    assert len(a) >= 60
    for k in range(6):  # no colour feature tells a lesion patch from the same patch without lesion
        assert 0.4 < auroc(np.r_[a[:, k], b[:, k]], np.r_[np.ones(len(a)), np.zeros(len(b))]) < 0.6, k
    shift = np.abs((a - b).mean(0))
    assert (shift[:3] < 0.01).all(), shift  # RGB: less than 2.6 grey levels
    assert (shift[3:] < 0.1 * b[:, 3:].mean(0)).all(), shift  # H, E, D: less than 10%
    assert (np.std(slide_means, axis=0) > 3 * shift).all()  # slides differ far more than classes


def test_every_slide_has_its_own_stain():
    """The colour of one tissue (fixed H and E amounts) varies by tens of grey levels between slides."""
    rgb = []
    for seed in range(50):
        s = slide_stain(np.random.default_rng(seed))
        od = 0.05 * s.h_amount * s.h + 0.24 * s.e_amount * s.e
        rgb.append(s.white * 10.0**-od)
        assert np.isclose(np.linalg.norm(s.h), 1) and np.isclose(np.linalg.norm(s.e), 1)
    rgb = np.array(rgb)
    assert (rgb.std(0) > 6).all() and (np.ptp(rgb, 0) > 25).all(), rgb.std(0)


def test_annotations_match_the_rendered_lesions(slides):
    """Large nuclei, found in the pixels, lie inside the annotated lesions, and there are many."""
    inside_total, outside_total = 0, 0
    for seed, rgb, _, tissue, lesions in slides:
        stain = HardPainter(SIDE, SIDE, tissue, lesions, seed, MPP).stain
        od = -np.log10(np.maximum(rgb.astype(np.float32), 1) / stain.white)
        unmix = np.linalg.lstsq(np.stack([stain.h, stain.e], 1), od.reshape(-1, 3).T, rcond=None)[0]
        nuclear = ndimage.binary_fill_holes(unmix[0].reshape(SIDE, SIDE) > 0.2)
        # what survives an opening with a disc of radius 4 um: nuclei larger than any normal one
        large = ndimage.binary_opening(nuclear, structure=disk(round(4.0 / MPP)))
        lab, n = ndimage.label(large)
        cy, cx = np.array(ndimage.center_of_mass(large, lab, np.arange(1, n + 1))).T
        inside = shapely.contains_xy(shapely.union_all(lesions).buffer(6 / MPP), cx + 0.5, cy + 0.5)
        inside_total += int(inside.sum())
        outside_total += int((~inside).sum())
    assert inside_total > 150
    assert outside_total <= 0.02 * inside_total, (inside_total, outside_total)


def test_annotations_file_is_the_geometry(tmp_path):
    manifest = make_cohort(tmp_path, 2, 512, 512, 8, difficulty="hard", lesion_slide_fraction=1.0)
    for row in csv.DictReader(manifest.open()):
        i = int(row["slide_id"].split("_")[1])
        seed = int(np.random.SeedSequence([8, i]).generate_state(1)[0])
        _, lesions = slide_geometry(512, 512, seed, difficulty="hard", mpp=MPP)
        back = read_annotations(manifest.parent / row["annotations"])
        assert len(back) == len(lesions) > 0
        assert all(p.equals_exact(q, 0.006) for p, q in zip(back, lesions, strict=True))


def test_cli_synth_hard_from_flags_and_config(tmp_path):
    from typer.testing import CliRunner

    from wsi_scaat.cli import app

    runner = CliRunner()
    flags = ["--slides", "2", "--width", "256", "--height", "256", "--seed", "4", "--lesion-fraction", "0.5"]
    out = tmp_path / "flags"
    result = runner.invoke(
        app, ["synth", "--out", str(out), *flags, "--difficulty", "hard", "--split-fractions", "1", "0", "1"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "synth.json").read_text())
    assert record["difficulty"] == "hard" and record["split_fractions"] == [1.0, 0.0, 1.0]
    config = tmp_path / "c.yaml"
    config.write_text(
        "cohort: {name: c, manifest: m.csv}\n"
        f"synth: {{out: {tmp_path / 'cfg'}, slides: 2, width: 256, height: 256, seed: 4,\n"
        "        lesion_slide_fraction: 0.5, difficulty: hard, split_fractions: [1, 0, 1]}\n"
    )
    result = runner.invoke(app, ["synth", "--config", str(config)])
    assert result.exit_code == 0, result.output
    for rel in ("manifest.csv", "slides/synth_000.tiff", "slides/synth_001.tiff"):
        assert (out / rel).read_bytes() == (tmp_path / "cfg" / rel).read_bytes(), rel


def test_hard_config_holds_out_enough_lesion_slides():
    """configs/hard.yaml (on configs/demo.yaml): the hard preset, >= 8 held-out slides with lesions."""
    from wsi_scaat.config import load_config
    from wsi_scaat.synth.cohort import cohort_plan

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "demo.yaml", root / "configs" / "hard.yaml")
    s = cfg.synth
    assert s is not None and s.difficulty == "hard"
    labels, splits = cohort_plan(s.slides, s.seed, s.lesion_slide_fraction, s.split_fractions)
    held_out = [lab for lab, split in zip(labels, splits, strict=True) if split in cfg.evaluate.splits]
    assert sum(held_out) >= 8 and 0 in held_out
    assert cfg.saliency.splits == cfg.evaluate.splits == ["test"]
    assert {split for lab, split in zip(labels, splits, strict=True) if lab == 0} >= {"train", "test"}
