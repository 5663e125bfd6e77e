"""The evaluation stage: ground-truth rasterisation, slide-level AUROC, sampling, the report, and one
model evaluated end to end on the tiny cohort, cross-checked against dense recomputation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from wsi_scaat.config import validate_config
from wsi_scaat.evaluation import LesionRegion, auroc_from_histograms, evaluate_model, heatmap_histograms
from wsi_scaat.evaluation.evaluate import _sample
from wsi_scaat.evaluation.report import metrics_markdown, write_report
from wsi_scaat.heatmaps.stitching import stitch, stitch_dense
from wsi_scaat.metrics import auroc, sparseness_gini
from wsi_scaat.saliency.stage import run_saliency
from wsi_scaat.saliency.store import open_saliency_store
from wsi_scaat.store import open_store


def test_patch_masks_use_pixel_centres() -> None:
    region = LesionRegion([box(10, 10, 30, 30)])
    masks = region.patch_masks(np.array([[0, 0], [20, 0]]), size0=40, map_size=4)
    # pixel centres at 5, 15, 25, 35 (+ x offset): inside for 15 and 25 in both axes
    expected = np.zeros((4, 4), bool)
    expected[1:3, 1:3] = True
    assert (masks[0] == expected).all()
    expected = np.zeros((4, 4), bool)
    expected[1:3, 0] = True  # second patch: columns at x = 25, 35, 45, 55
    assert (masks[1] == expected).all()
    assert not LesionRegion([]).patch_masks(np.zeros((2, 2)), 40, 4).any()


def test_grid_mask_matches_patch_masks() -> None:
    region = LesionRegion([box(3, 7, 50, 29)])
    grid = region.grid_mask((0, 8), (0, 8), 8.0)
    assert (grid == region.patch_masks(np.array([[0, 0]]), 64, 8)[0]).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 300))
def test_histogram_auroc_equals_rank_auroc(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    bins = 64
    values = rng.integers(0, bins, n) / bins  # on bin edges: the binned statistic is exact
    labels = rng.random(n) < 0.4
    idx = np.floor(values * bins).astype(int)
    pos = np.bincount(idx[labels], minlength=bins)
    neg = np.bincount(idx[~labels], minlength=bins)
    expected = auroc(values, labels)
    got = auroc_from_histograms(pos, neg)
    assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_sample_is_stratified_seeded_and_eligible_only() -> None:
    labels = [np.array([1] * 10 + [0] * 30), np.array([0] * 20 + [1] * 5)]
    eligible = [np.ones(40, bool), np.r_[np.zeros(10, bool), np.ones(15, bool)]]
    a = _sample(labels, eligible, 20, seed=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in _sample(labels, eligible, 20, seed=3)]
    picked = [(k, int(i)) for k, idx in enumerate(a) for i in idx]
    assert len(picked) == 20
    assert sum(labels[k][i] for k, i in picked) == 10  # half lesion
    assert all(eligible[k][i] for k, i in picked)
    assert all((np.diff(x) > 0).all() for x in a)  # sorted, for h5 reads
    few = _sample([np.array([1, 0, 0, 0, 0, 0])], [np.ones(6, bool)], 4, seed=0)
    assert len(few[0]) == 4 and 0 in few[0]  # the only lesion patch is taken, negatives fill the rest


def test_markdown_marks_the_best_and_the_differences_whose_interval_excludes_zero() -> None:
    from wsi_scaat.evaluation.report import COLUMNS, RunRow
    from wsi_scaat.evaluation.statistics import Interval

    cfg = validate_config({"cohort": {"name": "c", "manifest": "m.csv"}, "evaluate": {"bootstrap": 100}})
    nan = Interval(float("nan"), float("nan"), float("nan"))
    base = {key: nan for key, *_ in COLUMNS}
    erm = RunRow(
        "erm",
        "erm",
        ["erm", "erm.s1"],
        {
            **base,
            "gini": Interval(0.4, 0.38, 0.42),
            "accuracy": Interval(0.9, 0.88, 0.92),
            "deletion_auc": Interval(0.3, 0.25, 0.35),
        },
        {},
    )
    scaat = RunRow("scaat", "scaat (mask_ratio=0.5)", ["scaat"], {**base, "gini": Interval(0.7, 0.65, 0.75),
                   "accuracy": Interval(0.9, 0.87, 0.93), "deletion_auc": Interval(0.2, 0.15, 0.25)},
                   {**base, "gini": Interval(0.3, 0.2, 0.4), "accuracy": Interval(0.0, -0.02, 0.02),
                    "deletion_auc": Interval(-0.1, -0.2, 0.01)})  # fmt: skip
    text = metrics_markdown(cfg, [erm, scaat], [{"n_slides": 2, "splits": ["test"]}])
    lines = text.splitlines()
    first = [line for line in lines if line.startswith("| erm |")]
    runs = [line for line in lines if line.startswith("| scaat (mask_ratio=0.5) |")]
    assert len(first) == 1 and len(runs) == 2  # the values table, then the differences table
    assert "**0.700 [0.650, 0.750]**" in runs[0] and "0.400 [0.380, 0.420]" in first[0]
    assert "**0.200 [0.150, 0.250]**" in runs[0]  # deletion: lower is better
    assert first[0].count("**0.900") == 1 and runs[0].count("**0.900") == 1  # ties are both best
    assert "| 2 |" in first[0]  # seeds
    assert "+0.300* [+0.200, +0.400]" in runs[1]  # interval excludes 0: marked
    assert "+0.000 [-0.020, +0.020]" in runs[1] and "-0.100 [-0.200, +0.010]" in runs[1]  # not marked
    assert "Paired difference to `erm`" in text
    assert "ROAD" not in lines[0]  # a column without any value is left out


@pytest.fixture(scope="module")
def evaluated(tiny_cohort: dict, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny checkpoint explained, stitched and evaluated on the tiny cohort's lesion slide."""
    root = tmp_path_factory.mktemp("eval")
    cfg = validate_config({**tiny_cohort, "results_dir": str(root / "results"), "model_checkpoint":
                           str(tiny_checkpoint), "evaluate": {"splits": ["val"], "max_patches": 24,
                           "deletion_steps": 4, "road_percentages": [0.2, 0.6]}})  # fmt: skip
    tiles = Path(tiny_cohort["results_dir"]) / "tiny" / "tiles"
    (cfg.results / "tiles").parent.mkdir(parents=True)
    (cfg.results / "tiles").symlink_to(tiles)
    sal_dir, heat_dir = cfg.results / "saliency" / "pretrained", cfg.results / "heatmaps" / "pretrained"
    sal = run_saliency(tiny_checkpoint, tiles / "synth_001.h5", sal_dir, target="lesion", progress=False)
    heat = stitch(sal, heat_dir / "synth_001.heatmap.zarr", chunk=64)
    out = cfg.results / "evaluation"
    summary = evaluate_model(cfg, "pretrained", out, log=lambda _: None)
    return {"cfg": cfg, "summary": summary, "sal": sal, "heat": heat, "out": out, "tiles": tiles}


def test_evaluation_figures_match_recomputation(evaluated: dict) -> None:
    s, cfg = evaluated["summary"], evaluated["cfg"]
    sal = open_saliency_store(evaluated["sal"])
    with open_store(evaluated["tiles"] / "synth_001.h5") as tiles:
        labels = tiles.array("labels")
    probs = sal.array("probs")
    assert s["n_patches"] == len(labels) and s["n_slides"] == 1
    assert s["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    maps = torch.from_numpy(np.asarray(sal.maps[...], dtype=np.float32))
    assert s["gini"] == pytest.approx(float(sparseness_gini(maps).double().mean()), rel=1e-9)
    # slide level: the out-of-core histogram AUROC equals the dense canvas' rank AUROC
    region = LesionRegion.from_geojson(Path(cfg.cohort.manifest).parent / "annotations/synth_001.geojson")
    dense = stitch_dense(evaluated["sal"], value=cfg.stitch.value)  # as stitched
    hd = float(sal.attrs["patch_size_level0"]) / int(sal.attrs["map_size"])
    lesion = region.grid_mask((0, dense.shape[0]), (0, dense.shape[1]), hd)
    from wsi_scaat.heatmaps.stitching import tissue_pixels

    tissue = tissue_pixels(np.asarray(sal.array("tissue_mask")), float(sal.attrs["tissue_downsample"]), hd,
                           (0, dense.shape[0], 0, dense.shape[1]))  # fmt: skip
    expected = auroc(dense[tissue], lesion[tissue])
    assert 0 < lesion[tissue].mean() < 1
    assert s["heatmap_auroc"] == pytest.approx(expected, abs=1e-4)
    pos, neg = heatmap_histograms(evaluated["heat"], evaluated["sal"], region)
    assert pos.sum() + neg.sum() == tissue.sum() and pos.sum() == (lesion & tissue).sum()
    # every heatmap value, blended from the store (hd grid: exactly each value's stitched heatmap)
    by_value = s["heatmap_auroc_by_value"]
    assert set(by_value) == {"saliency", "evidence", "weighted", "probability"}
    assert by_value[cfg.stitch.value] == s["heatmap_auroc"]
    for value, got in by_value.items():
        values = stitch_dense(evaluated["sal"], value=value)
        assert got == pytest.approx(auroc(values[tissue], lesion[tissue]), abs=1e-4), value
    # localisation only on mixed patches (lesion fraction 0.1-0.9), over tissue pixels
    with open_store(evaluated["tiles"] / "synth_001.h5") as tiles:
        lf = tiles.array("lesion_fraction")
    n_mixed = int(((lf >= 0.1) & (lf <= 0.9)).sum())
    assert 0 < s["pointing_game_n"] == s["auroc_localisation_n"] <= n_mixed
    assert 0 < s["loc_lesion_pixels_total"] < s["loc_pixels_total"] <= n_mixed * maps.shape[-1] ** 2
    assert 0 < s["deletion_auc_n"] <= 24
    for key in ("deletion_auc", "deletion_auc_random", "insertion_auc", "road_morf", "road_lerf",
                "reconstruction_kept", "gini", "gini_pool2", "parity_balance", "correct"):  # fmt: skip
        assert 0.0 <= s[key] <= 1.0, key
    assert -1.0 <= s["randomisation_spearman"] <= 1.0
    assert s["correct"] == pytest.approx(s["accuracy"])


def test_evaluation_writes_per_patch_rows_and_report(evaluated: dict) -> None:
    out, s = evaluated["out"], evaluated["summary"]
    with (out / "models" / "pretrained.patches.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == s["n_patches"]
    gini = np.array([float(r["gini"]) for r in rows])
    assert gini.mean() == pytest.approx(s["gini"], rel=1e-5)
    assert sum(r["deletion_auc"] != "" for r in rows) == s["deletion_auc_n"]
    done = [r for r in rows if r["deletion_auc"] != ""]
    for r in done:  # the gap is the random order's deletion AUC minus the map's
        gap = float(r["deletion_auc_random"]) - float(r["deletion_auc"])
        assert float(r["deletion_gap"]) == pytest.approx(gap, abs=2e-6)
    hists = np.load(out / "models" / "pretrained.slides.npz")
    assert list(hists["slide_ids"]) == ["synth_001"]
    assert hists["probability"].sum() == s["n_patches"]  # every patch in the class-probability histogram
    assert hists["heatmap"].shape == (1, 2048) and hists["heatmap"].sum() > 0
    paths = write_report(evaluated["cfg"], out, ["pretrained"])
    table = paths["markdown"].read_text()
    assert table.startswith("| run | seeds |") and "| pretrained | 1 |" in table
    with paths["runs"].open() as f:
        (run,) = list(csv.DictReader(f))
    assert float(run["gini"]) == pytest.approx(s["gini"], rel=1e-5)  # one slide, one seed: the mean
    assert float(run["accuracy"]) == pytest.approx(s["accuracy"])
    assert float(run["heatmap_auroc"]) == pytest.approx(s["heatmap_auroc"], abs=2e-3)  # 1024 bins
    with paths["csv"].open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["gini"]) == pytest.approx(s["gini"])
    for value, auc in s["heatmap_auroc_by_value"].items():  # a column per heatmap value
        assert f"slide AUROC: {value} ↑" in table
        assert float(row[f"heatmap_auroc_{value}"]) == pytest.approx(auc)
    assert f"stitch.value = {evaluated['cfg'].stitch.value}" in table
    from PIL import Image

    for kind in ("figure_grid", "tradeoff"):
        with Image.open(paths[kind]) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def _value_store(path: Path, overlap: bool) -> Path:
    """512 x 384 px slide of 32-px patches with 8-px maps (hd = 4: heatmap 96 x 128), random signed maps
    and probabilities, no tissue left of x = 64; with ``overlap``, patches at half-patch offsets too."""
    from wsi_scaat.saliency.store import create_saliency_store

    rng = np.random.default_rng(3)
    ys, xs = np.mgrid[0:384:32, 0:512:32]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    extra = coords[(coords[:, 0] < 480) & (coords[:, 1] < 352)] + 16
    attrs = {"slide_id": "v", "slide_width": 512, "slide_height": 384, "patch_size_level0": 32, "map_size": 8,
             "tissue_downsample": 32.0, "saliency_target": "lesion"}  # fmt: skip
    tissue = np.ones((12, 16), np.uint8)
    tissue[:, :2] = 0
    with create_saliency_store(path, len(coords), 2, 8, attrs, signed=True) as w:
        w.write_array("coords", coords)
        w.write_array("tissue_mask", tissue)
        sets = [(w, len(coords))] + ([(w.overlap(len(extra), 2, 8), len(extra))] if overlap else [])
        for writer, n in sets:
            if writer is not w:
                writer.write_array("coords", extra)
            signed = rng.normal(0, 1, (n, 8, 8))
            p = rng.random(n)
            writer.write(0, np.abs(signed), np.stack([1 - p, p], 1), np.ones(n), signed=signed)
    return path


def test_value_map_is_the_stitched_heatmap_on_a_bounded_grid(tmp_path: Path) -> None:
    from wsi_scaat.evaluation.slide_auroc import value_histograms
    from wsi_scaat.heatmaps.bounded import value_map

    store = _value_store(tmp_path / "o.saliency.zarr", overlap=True)
    for value in ("saliency", "evidence", "weighted", "probability"):
        vm = value_map(store, value)  # heatmap fits: the grid is the heatmap's
        assert vm.pixel == 4.0 and np.array_equal(vm.values, stitch_dense(store, value=value)), value
    # at most 40 px a side: f = ceil(128 / 40) = 4 heatmap px (16 level-0 px), blocks of q = 4 map px
    small = value_map(store, "probability", max_side=40)
    assert small.values.shape == (24, 32) and small.pixel == 16.0
    assert not small.tissue[:, :4].any() and small.tissue[:, 4:].all()  # no tissue left of x = 64
    assert (small.values[:, :4] == 0).all() and 0 < small.values[:, 4:].min() <= small.values.max() < 1
    # without overlap and with flat weights, each coarse pixel is one patch's p, exactly
    plain = _value_store(tmp_path / "p.saliency.zarr", overlap=False)
    flat = value_map(plain, "probability", max_side=40, window="flat")
    p = open_saliency_store(plain).target_probability().reshape(12, 16).astype(np.float32)
    assert np.array_equal(flat.values[:, 4:], np.kron(p, np.ones((2, 2), np.float32))[:, 4:])
    region = LesionRegion([box(128, 0, 512, 384)])  # lesion: coarse columns 8.. (centres from x = 136)
    pos, neg = value_histograms(store, region, "probability", max_side=40)
    assert pos.sum() == 24 * 24 and neg.sum() == 24 * 4  # tissue pixels only
