"""Stitching patch saliency maps into heatmap pyramids: exact numbers on small synthetic saliency stores."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsi_scaat.heatmaps import stitching
from wsi_scaat.heatmaps.pyramid import coarsen2, level_shapes
from wsi_scaat.heatmaps.stitching import blend_window
from wsi_scaat.saliency.store import create_saliency_store

# Blending, placement, normalisation and storage are checked on the maps themselves (stitch.value
# "saliency"); the other values have their own tests below.
stitch = functools.partial(stitching.stitch, value="saliency")
stitch_dense = functools.partial(stitching.stitch_dense, value="saliency")

MapsFn = Callable[[np.ndarray, int], np.ndarray]  # (coords (n, 2), map_size) -> (n, m, m)
RAW = {"normalize": False, "mask_tissue": False}


def grid(width: int, height: int, patch_l0: int, stride_l0: int) -> np.ndarray:
    """Row-major top-left coords of a patch grid covering the slide (last patches may overhang)."""
    ys, xs = np.arange(0, height, stride_l0), np.arange(0, width, stride_l0)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)


def make_store(path: Path, width: int, height: int, *, patch_l0: int, map_size: int, coords: np.ndarray,
               maps: MapsFn | np.ndarray, tissue: np.ndarray | None = None, td: int = 16,
               signed: np.ndarray | None = None, probs: np.ndarray | None = None,
               overlap: tuple[np.ndarray, ...] | None = None) -> Path:  # fmt: skip
    """A saliency store (written with create_saliency_store) for the given patch coords and maps; with
    ``signed`` (version 2) its signed maps, ``probs`` (N, 2) the class probabilities (target class 1),
    ``overlap`` = (coords, maps, signed, probs) of an overlap group."""
    n = len(coords)
    if tissue is None:
        tissue = np.ones((-(-height // td), -(-width // td)), np.uint8)
    attrs = {"slide_id": path.name.split(".")[0], "source_path": "x.tiff", "slide_width": width,
             "slide_height": height, "mpp_level0": 0.25, "patch_size": patch_l0,
             "patch_size_level0": patch_l0, "map_size": map_size, "map_downsample": patch_l0 // map_size,
             "class_names": ["a", "b"], "saliency_method": "gradient", "saliency_target": "predicted",
             "tissue_downsample": td}  # fmt: skip
    with create_saliency_store(path, n, 2, map_size, attrs, signed=signed is not None) as w:
        w.write_array("coords", coords.astype(np.int64))
        w.write_array("tissue_mask", tissue.astype(np.uint8))
        for s in range(0, n, 64):
            chunk = maps[s : s + 64] if isinstance(maps, np.ndarray) else maps(coords[s : s + 64], map_size)
            if probs is None:
                w.write(s, chunk, np.full((len(chunk), 2), 0.5), np.zeros(len(chunk)))
            else:
                w.write(s, chunk, probs[s : s + 64], np.ones(len(chunk)),
                        signed=None if signed is None else signed[s : s + 64])  # fmt: skip
        if overlap is not None:
            o_coords, o_maps, o_signed, o_probs = overlap
            sub = w.overlap(len(o_coords), 2, map_size)
            sub.write_array("coords", o_coords.astype(np.int64))
            sub.write(0, o_maps, o_probs, np.ones(len(o_coords)), signed=o_signed)
    return path


def level(path: Path, k: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_array(str(path / str(k)), mode="r")[...])


def constant(c: float) -> MapsFn:
    return lambda coords, m: np.full((len(coords), m, m), c, np.float16)


def test_blend_window() -> None:
    from scipy.signal.windows import hann

    w = blend_window(7, "hann")
    assert w.shape == (7, 7) and w.dtype == np.float32 and (w > 0).all()
    np.testing.assert_allclose(w, np.outer(hann(9)[1:-1], hann(9)[1:-1]), rtol=1e-6)
    assert (blend_window(5, "flat") == 1).all()
    with pytest.raises(ValueError):
        blend_window(4, "gauss")


@pytest.mark.parametrize("window", ["hann", "flat"])
@pytest.mark.parametrize("stride", [32, 20, 13])  # no overlap, overlap, odd overlap
def test_constant_maps_stitch_to_the_constant(tmp_path: Path, window: str, stride: int) -> None:
    # hd = 4: 32-px patches, 8-px maps; stride 13 puts patches at rounded, uneven heatmap positions
    s = make_store(tmp_path / "c.saliency.zarr", 200, 150, patch_l0=32, map_size=8,
                   coords=grid(200, 150, 32, stride), maps=constant(0.3))  # fmt: skip
    dense = stitch_dense(s, window=window, **RAW)
    assert dense.shape == (38, 50)  # ceil(150 / 4), ceil(200 / 4)
    assert (dense == np.float32(np.float16(0.3))).all()
    out = stitch(s, tmp_path / "c.heatmap.zarr", chunk=16, window=window, **RAW)
    assert np.array_equal(level(out), dense)


@pytest.mark.parametrize("window", ["hann", "flat"])
def test_linear_ramp_stitches_to_the_ramp(tmp_path: Path, window: str) -> None:
    def ramp(coords: np.ndarray, m: int) -> np.ndarray:  # value = global heatmap column (exact in float16)
        col0 = np.rint(coords[:, 0] / 4).astype(int)
        ramp = (col0[:, None] + np.arange(m))[:, None, :]
        return np.broadcast_to(ramp, (len(coords), m, m)).astype(np.float16)

    coords = grid(300, 120, 32, 12)
    coords = coords[(coords[:, 0] // 12 + coords[:, 1] // 12) % 3 != 0]  # holes in the grid
    s = make_store(tmp_path / "r.saliency.zarr", 300, 120, patch_l0=32, map_size=8, coords=coords, maps=ramp)
    dense = stitch_dense(s, window=window, **RAW)
    cover = np.zeros(dense.shape, bool)
    for x, y in coords:
        cover[round(y / 4) : round(y / 4) + 8, round(x / 4) : round(x / 4) + 8] = True
    expected = np.where(cover, np.arange(dense.shape[1], dtype=np.float32)[None, :], 0)
    assert np.array_equal(dense, expected)
    assert np.array_equal(level(stitch(s, tmp_path / "r.heatmap.zarr", chunk=8, window=window, **RAW)), dense)


def test_border_patches_and_empty_regions(tmp_path: Path) -> None:
    # 150 x 100 slide, 32-px patches, hd = 4: heatmap 25 x 38; the last column/row of patches overhangs
    coords = grid(150, 100, 32, 32)
    coords = coords[(coords[:, 0] >= 64) | (coords[:, 1] >= 64)]  # no patch in the top-left 64 x 64 px
    s = make_store(tmp_path / "b.saliency.zarr", 150, 100, patch_l0=32, map_size=8, coords=coords,
                   maps=constant(2.0))  # fmt: skip
    dense = stitch_dense(s, window="hann", **RAW)
    assert dense.shape == (25, 38)
    expected = np.full((25, 38), 2.0, np.float32)
    expected[:16, :16] = 0
    assert np.array_equal(dense, expected)
    assert np.array_equal(level(stitch(s, tmp_path / "b.heatmap.zarr", chunk=7, **RAW)), dense)


@pytest.mark.parametrize(("x", "y", "r", "c"), [(37, 6, 2, 5), (10, 30, 7, 0), (90, 50, 0, 7)])
def test_placement(tmp_path: Path, x: int, y: int, r: int, c: int) -> None:
    maps = np.zeros((1, 8, 8), np.float16)
    maps[0, r, c] = 1
    s = make_store(tmp_path / "p.saliency.zarr", 128, 96, patch_l0=32, map_size=8,
                   coords=np.array([[x, y]]), maps=maps)  # fmt: skip
    dense = stitch_dense(s, **RAW)
    expected = np.zeros((24, 32), np.float32)
    expected[round(y / 4) + r, round(x / 4) + c] = 1  # round half to even, like the contract's round()
    assert np.array_equal(dense, expected)


def test_placement_fractional_downsample(tmp_path: Path) -> None:
    # 50-px patches, 8-px maps: hd = 6.25; heatmap ceil(130 / 6.25) x ceil(200 / 6.25) = 21 x 32
    maps = np.zeros((2, 8, 8), np.float16)
    maps[0, 0, 0], maps[1, 7, 7] = 1, 2
    s = make_store(tmp_path / "q.saliency.zarr", 200, 130, patch_l0=50, map_size=8,
                   coords=np.array([[37, 19], [150, 81]]), maps=maps)  # fmt: skip
    dense = stitch_dense(s, **RAW)
    expected = np.zeros((21, 32), np.float32)
    expected[3, 6] = 1  # round(19 / 6.25) = 3, round(37 / 6.25) = 6
    expected[13 + 7, 24 + 7] = 2  # round(81 / 6.25) = 13, round(150 / 6.25) = 24
    assert np.array_equal(dense, expected)
    assert np.array_equal(level(stitch(s, tmp_path / "q.heatmap.zarr", chunk=8, **RAW)), expected)


def random_maps(seed: int) -> MapsFn:
    rng = np.random.default_rng(seed)  # called chunk after chunk, in store order
    return lambda coords, m: rng.random((len(coords), m, m)).astype(np.float16)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stride=st.integers(6, 40), keep=st.floats(0.3, 1.0), seed=st.integers(0, 99),
       window=st.sampled_from(["hann", "flat"]), chunk=st.sampled_from([32, 24, 50]),
       patch=st.sampled_from([64, 50]))  # fmt: skip
def test_dask_equals_dense(stride: int, keep: float, seed: int, window: str, chunk: int, patch: int) -> None:
    # heatmap 100 x 150 (hd = 4 with 64-px patches and 16-px maps) or 128 x 192 (hd = 3.125 with 50-px
    # patches): chunks cut through patches
    rng = np.random.default_rng(seed)
    coords = grid(600, 400, patch, stride)
    coords = coords[rng.random(len(coords)) < keep]
    tissue = (rng.random((25, 38)) < 0.8).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        s = make_store(Path(tmp) / "h.saliency.zarr", 600, 400, patch_l0=patch, map_size=16, coords=coords,
                       maps=random_maps(seed), tissue=tissue, td=16)  # fmt: skip
        dense = stitch_dense(s, window=window)
        out = stitch(s, Path(tmp) / "h.heatmap.zarr", chunk=chunk, window=window)
        assert dense.shape == ((100, 150) if patch == 64 else (128, 192))
        assert np.array_equal(level(out), dense)
        assert dense.min() >= 0 and dense.max() <= 1


def test_normalisation_percentiles(tmp_path: Path) -> None:
    coords = grid(256, 256, 32, 32)
    s = make_store(tmp_path / "n.saliency.zarr", 256, 256, patch_l0=32, map_size=8, coords=coords,
                   maps=random_maps(1))  # fmt: skip
    values = np.asarray(zarr.open_array(str(s / "maps"))[...], np.float64)
    lo, hi = np.percentile(values, [5, 90])
    out = stitch(s, tmp_path / "n.heatmap.zarr", chunk=16, low_percentile=5, high_percentile=90,
                 window="flat")  # fmt: skip
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["normalization"] == {"method": "percentile", "low_percentile": 5.0, "high_percentile": 90.0,
                                      "low": lo, "high": hi}  # fmt: skip
    raw = stitch_dense(s, window="flat", **RAW)  # non-overlapping flat: the maps themselves
    expected = np.clip((raw.astype(np.float64) - lo) / (hi - lo), 0, 1).astype(np.float32)
    assert np.array_equal(level(out), expected)
    assert 0 < (expected == 0).mean() < 0.1 and 0 < (expected == 1).mean() < 0.2


def test_normalisation_degenerate_range(tmp_path: Path) -> None:
    maps = np.zeros((4, 8, 8), np.float16)
    maps[1, 3, 3] = 0.5  # 1 value in 256: the 1st and 99th percentiles are both 0
    s = make_store(tmp_path / "d.saliency.zarr", 64, 64, patch_l0=32, map_size=8, coords=grid(64, 64, 32, 32),
                   maps=maps)  # fmt: skip
    dense = stitch_dense(s)
    expected = np.zeros((16, 16), np.float32)
    expected[3, 8 + 3] = 1  # v_hi == v_lo: 1 where v > v_lo
    assert np.array_equal(dense, expected)
    assert np.array_equal(stitch_dense(s, **RAW) > 0, dense > 0)


def test_chunk_cache_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_scaat.heatmaps import pyramid

    s = make_store(tmp_path / "k.saliency.zarr", 640, 640, patch_l0=32, map_size=8,
                   coords=grid(640, 640, 32, 32), maps=random_maps(6))  # fmt: skip
    maps = zarr.open_array(str(s / "maps"), mode="r")
    everything = maps[...]
    monkeypatch.setattr(pyramid, "CACHE", pyramid.ChunkCache(3 * 64 * 8 * 8 * 2))  # 3 chunks: evictions
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = np.unique(rng.integers(0, len(everything), rng.integers(1, 300)))
        assert np.array_equal(pyramid.read_patches_cached(maps, idx, "run"), everything[idx])
        assert np.array_equal(pyramid.read_patches(maps, idx), everything[idx])
    assert pyramid.CACHE._bytes <= pyramid.CACHE.max_bytes
    pyramid.CACHE.drop("run")
    assert pyramid.CACHE._bytes == 0 and not pyramid.CACHE._data
    stitch(s, tmp_path / "k.heatmap.zarr", chunk=32)
    assert pyramid.CACHE._bytes == 0  # a run forgets its chunks


def test_subsample_is_deterministic_and_spread() -> None:
    idx = stitching.sample_indices(1000, 64, budget=64 * 64 * 100)
    assert len(idx) == 100 and idx[0] == 5 and (np.diff(idx) == 10).all()
    assert (stitching.sample_indices(50, 8) == np.arange(50)).all()


def test_tissue_masking(tmp_path: Path) -> None:
    # td = 16 level-0 px = 4 heatmap px: heatmap pixel (r, c) has its centre on mask pixel (r // 4, c // 4)
    tissue = np.ones((8, 10), np.uint8)
    tissue[2:5, 3:7] = 0
    s = make_store(tmp_path / "t.saliency.zarr", 160, 128, patch_l0=32, map_size=8,
                   coords=grid(160, 128, 32, 16), maps=random_maps(3), tissue=tissue)  # fmt: skip
    masked, unmasked = stitch_dense(s), stitch_dense(s, mask_tissue=False)
    keep = np.kron(tissue, np.ones((4, 4), np.uint8)).astype(bool)[:32, :40]
    assert np.array_equal(masked, np.where(keep, unmasked, 0))
    assert (unmasked[~keep] > 0).any()
    out = stitch(s, tmp_path / "t.heatmap.zarr", chunk=16)
    assert np.array_equal(level(out), masked)


def test_pyramid_levels_and_attrs(tmp_path: Path) -> None:
    # hd = 1 (64-px patches and maps): level 0 is 1031 x 530 -> 516 x 265 -> 258 x 133
    s = make_store(tmp_path / "slide7.saliency.zarr", 530, 1031, patch_l0=64, map_size=64,
                   coords=grid(530, 1031, 64, 48), maps=random_maps(5))  # fmt: skip
    out = stitch(s, tmp_path / "slide7.heatmap.zarr", chunk=256)
    assert level_shapes(1031, 530) == [(1031, 530), (516, 265), (258, 133)]
    root = zarr.open_group(str(out), mode="r")
    assert sorted(root.array_keys()) == ["0", "1", "2"]
    l0, l1, l2 = level(out, 0), level(out, 1), level(out, 2)
    assert [a.shape for a in (l0, l1, l2)] == level_shapes(1031, 530)
    assert all(root[k].chunks == (256, 256) and root[k].dtype == np.float32 for k in "012")
    pad = np.pad(l0, ((0, 1), (0, 0)), mode="edge").astype(np.float64)  # odd height: edge padding
    np.testing.assert_allclose(l1, pad.reshape(516, 2, 265, 2).mean((1, 3)), atol=1e-6)
    np.testing.assert_allclose(l2, coarsen2(l1), atol=0)
    a = dict(root.attrs)
    assert a["slide_id"] == "slide7" and a["heatmap_downsample"] == 1.0 and a["heatmap_version"] == 2
    assert a["level_downsamples"] == [1, 2, 4] and a["window"] == "hann" and a["map_size"] == 64
    assert a["value"] == "saliency" and a["meaning"] == "predicted-class saliency (|attribution|)"
    ms = a["multiscales"][0]
    assert [ax["name"] for ax in ms["axes"]] == ["y", "x"] and ms["axes"][0]["unit"] == "micrometer"
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    assert ms["datasets"][2]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]  # 0.25 um * 1 * 4


def test_failure_leaves_no_output(tmp_path: Path) -> None:
    s = make_store(tmp_path / "f.saliency.zarr", 600, 400, patch_l0=64, map_size=16,
                   coords=grid(600, 400, 64, 32), maps=random_maps(2))  # fmt: skip
    out = tmp_path / "f.heatmap.zarr"
    stitch(s, out, chunk=32, normalize=False)
    before = level(out)
    chunk_file = next(p for p in (s / "maps" / "c").rglob("*") if p.is_file())
    chunk_file.write_bytes(b"garbage, not zstd")
    with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises, inside a dask task
        stitch(s, out, chunk=32, normalize=False)
    assert np.array_equal(level(out), before)  # the previous output is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(Exception):  # noqa: B017 - here while sampling the percentiles
        stitch(s, tmp_path / "g.heatmap.zarr", chunk=32)
    assert not (tmp_path / "g.heatmap.zarr").exists()


def test_distributed_equals_threads(tmp_path: Path) -> None:
    from dask.distributed import LocalCluster

    s = make_store(tmp_path / "x.saliency.zarr", 600, 400, patch_l0=64, map_size=16,
                   coords=grid(600, 400, 64, 40), maps=random_maps(4))  # fmt: skip
    local = stitch(s, tmp_path / "local.heatmap.zarr", chunk=32)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = stitch(s, tmp_path / "remote.heatmap.zarr", chunk=32, scheduler=cluster.scheduler_address)
    for k in range(len(level_shapes(100, 150))):
        assert np.array_equal(level(local, k), level(remote, k))
    assert level(remote).any()


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) peak, inherited through exec
MEMORY_SCRIPT = """
import json, resource, sys
import wsi_scaat.heatmaps.stitching as st
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
st.stitch(sys.argv[1], sys.argv[2], chunk=512)
print(json.dumps({"base": base, "peak": rss()}))
"""


def test_peak_memory_stays_far_below_the_canvas(tmp_path: Path) -> None:
    # 20,000 x 20,000 px slide, 256-px patches, 64-px maps: heatmap 5000 x 5000 (dense float64 num + den
    # = 400 MB, float32 canvas = 100 MB); the stitcher must stay well below the dense buffers
    coords = grid(20000, 20000, 256, 256)

    def smooth(c: np.ndarray, m: int) -> np.ndarray:
        j = np.arange(m) / m
        u = np.sin(c[:, 0, None, None] / 997 + j[None, None, :])
        return (u * np.cos(c[:, 1, None, None] / 701 + j[None, :, None]) + 1).astype(np.float16)

    s = make_store(tmp_path / "m.saliency.zarr", 20000, 20000, patch_l0=256, map_size=64, coords=coords,
                   maps=smooth, td=64)  # fmt: skip
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(s), str(tmp_path / "m.heatmap.zarr")],
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    mb = json.loads(res.stdout.strip().splitlines()[-1])
    assert mb["peak"] - mb["base"] < 200 and mb["peak"] < 600, mb
    assert zarr.open_array(str(tmp_path / "m.heatmap.zarr" / "0")).shape == (5000, 5000)


def _valued_store(path: Path, seed: int, with_overlap: bool) -> tuple[Path, dict]:
    """A 192 x 128 slide of 32-px patches (8-px maps, hd = 4) with signed maps, probabilities and, if
    asked, an overlap group at half-patch offsets; returns the store and its arrays."""
    rng = np.random.default_rng(seed)
    coords = grid(192, 128, 32, 32)
    n, m = len(coords), 8
    signed = rng.normal(0, 1, (n, m, m)).astype(np.float16)
    probs = rng.random(n).astype(np.float32).astype(np.float64)  # stored as float32
    data = {"coords": coords, "signed": signed, "maps": np.abs(signed), "p": probs}
    overlap = None
    if with_overlap:
        o = grid(176, 112, 32, 16)
        o = o[(o[:, 0] % 32 != 0) | (o[:, 1] % 32 != 0)]
        o_signed = rng.normal(0, 1, (len(o), m, m)).astype(np.float16)
        o_p = rng.random(len(o)).astype(np.float32).astype(np.float64)
        overlap = (o, np.abs(o_signed), o_signed, np.stack([1 - o_p, o_p], 1))
        data |= {"o_coords": o, "o_signed": o_signed, "o_p": o_p}
    s = make_store(path, 192, 128, patch_l0=32, map_size=m, coords=coords, maps=np.abs(signed),
                   signed=signed, probs=np.stack([1 - probs, probs], 1), overlap=overlap)  # fmt: skip
    return s, data


def test_values_without_overlap_are_the_patch_values(tmp_path: Path) -> None:
    """Non-overlapping flat blending leaves each patch's values: check each value by hand."""
    s, d = _valued_store(tmp_path / "v.saliency.zarr", 0, False)
    sig = d["signed"].astype(np.float64)
    per_patch = {
        "saliency": np.abs(sig),
        "evidence": np.maximum(sig, 0),
        "weighted": np.abs(sig) * d["p"][:, None, None],
        "probability": np.broadcast_to(d["p"][:, None, None], sig.shape),
    }
    for value, expected_patches in per_patch.items():
        got = stitch_dense(s, window="flat", value=value, **RAW)
        expected = np.zeros((32, 48), np.float32)
        for (x, y), v in zip(d["coords"], expected_patches, strict=True):
            expected[y // 4 : y // 4 + 8, x // 4 : x // 4 + 8] = v.astype(np.float32)
        assert np.array_equal(got, expected), value
    # normalised: percentiles of the saliency factor; probability as it is
    out = stitch(s, tmp_path / "w.heatmap.zarr", chunk=16, window="flat", value="weighted")
    norm = dict(zarr.open_group(str(out), mode="r").attrs)["normalization"]
    lo, hi = np.percentile(np.abs(sig), [1, 99])
    assert (norm["low"], norm["high"]) == (lo, hi)
    raw = stitch_dense(s, window="flat", value="weighted", **RAW).astype(np.float64)
    assert np.array_equal(level(out), np.clip((raw - lo) / (hi - lo), 0, 1).astype(np.float32))
    out = stitch(s, tmp_path / "p.heatmap.zarr", chunk=16, value="probability", mask_tissue=False)
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["normalization"]["method"] == "none" and attrs["value"] == "probability"
    assert attrs["meaning"] == "p(predicted class)"
    assert np.array_equal(level(out), stitch_dense(s, value="probability", **RAW))
    ev = dict(zarr.open_group(str(stitch(s, tmp_path / "e.heatmap.zarr", value="evidence")), mode="r").attrs)
    assert ev["normalization"]["high"] == np.percentile(np.maximum(sig, 0), 99)


@pytest.mark.parametrize("value", ["saliency", "evidence", "weighted", "probability"])
def test_overlap_patches_are_blended(tmp_path: Path, value: str) -> None:
    s, d = _valued_store(tmp_path / "o.saliency.zarr", 1, True)
    dense = stitch_dense(s, value=value, **RAW)
    # by hand: every patch, the store's then the overlap's, Hann-weighted
    num, den = np.zeros((32, 48)), np.zeros((32, 48))
    w = blend_window(8, "hann").astype(np.float64)
    sig = np.concatenate([d["signed"], d["o_signed"]]).astype(np.float64)
    p = np.concatenate([d["p"], d["o_p"]])
    pix = {"saliency": np.abs(sig), "evidence": np.maximum(sig, 0),
           "weighted": np.abs(sig) * p[:, None, None],
           "probability": np.broadcast_to(p[:, None, None], sig.shape)}[value]  # fmt: skip
    for (x, y), v in zip(np.concatenate([d["coords"], d["o_coords"]]), pix, strict=True):
        num[y // 4 : y // 4 + 8, x // 4 : x // 4 + 8] += w * v
        den[y // 4 : y // 4 + 8, x // 4 : x // 4 + 8] += w
    np.testing.assert_allclose(dense, num / den, rtol=1e-6)
    out = stitch(s, tmp_path / "o.heatmap.zarr", chunk=12, value=value)  # chunks cut through patches
    assert np.array_equal(level(out), stitch_dense(s, value=value))
    assert dict(zarr.open_group(str(out), mode="r").attrs)["n_overlap"] == len(d["o_coords"])


def test_evidence_needs_signed_maps(tmp_path: Path) -> None:
    from wsi_scaat.errors import StoreError

    s = make_store(tmp_path / "old.saliency.zarr", 64, 64, patch_l0=32, map_size=8,
                   coords=grid(64, 64, 32, 32), maps=constant(1.0))  # fmt: skip
    with pytest.raises(StoreError, match="old.saliency.zarr: has no signed maps .* re-run the saliency"):
        stitch(s, tmp_path / "old.heatmap.zarr", value="evidence")
    assert not (tmp_path / "old.heatmap.zarr").exists()
    assert stitch_dense(s, value="probability", **RAW).max() == np.float32(0.5)  # p of the old store
    with pytest.raises(ValueError, match="heatmap value must be one of"):
        stitch_dense(s, value="gradient")
