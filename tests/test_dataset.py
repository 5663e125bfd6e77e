"""Patch datasets, seeded loaders (order per epoch, workers, balance), cohort splits and augmentations."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_scaat.data import EpochSampler, PatchDataset, cohort_stores, make_loader
from wsi_scaat.data.augment import AugmentConfig, build_augment, stain_matrix_usable
from wsi_scaat.errors import StoreError
from wsi_scaat.manifest import read_manifest
from wsi_scaat.slides.tiling import TileParams, tile_slide
from wsi_scaat.store import create_store
from wsi_scaat.store.patch_store import REQUIRED_ATTRS
from wsi_scaat.synth import make_cohort

NO_AUG = AugmentConfig(flips=False, rotate90=False, color_jitter=0.0)


def write_store(path: Path, imgs: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """A minimal valid store holding ``imgs`` (N, P, P, 3) and optionally ``labels``."""
    n, p = imgs.shape[:2]
    with create_store(path, n, p) as writer:
        for i, img in enumerate(imgs):
            writer.write_chunk(i, writer.encode(img))
        writer.write_array("coords", np.stack([np.arange(n) * p, np.zeros(n)], 1).astype(np.int64))
        if labels is not None:
            writer.write_array("labels", np.asarray(labels, np.int64))
        writer.set_attrs({**{k: 1 for k in REQUIRED_ATTRS}, "patch_size": p})
    return path


def random_imgs(n: int, p: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, p, p, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """An h5 and a zarr store (5 + 3 patches of 16 px) with known pixels and labels."""
    folder = tmp_path_factory.mktemp("stores")
    a, b = random_imgs(5, 16, 0), random_imgs(3, 16, 1)
    la, lb = np.array([0, 1, 0, 0, 1]), np.array([1, 1, 0])
    paths = [write_store(folder / "a.h5", a, la), write_store(folder / "b.zarr", b, lb)]
    return paths, np.concatenate([a, b]), np.concatenate([la, lb])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic 5-slide cohort tiled into 48-px stores with patch labels: (manifest, tiles dir)."""
    root = tmp_path_factory.mktemp("cohort")
    manifest = make_cohort(root / "cohort", 5, 768, 768, seed=5)
    params = TileParams(patch_size=48, target_mpp=1.0, workers=1)
    for e in read_manifest(manifest):
        tile_slide(
            e.path, root / "tiles", params, slide_id=e.slide_id, annotations=e.annotations, progress=False
        )
    return manifest, root / "tiles"


@pytest.fixture(scope="module")
def he_patch(cohort) -> np.ndarray:
    """The most tissue-rich patch of the synthetic cohort (H&E-like colours)."""
    ds = PatchDataset(sorted(cohort[1].glob("*.h5")))
    imgs = np.stack([ds.read(i) for i in range(len(ds))])
    return imgs[np.argmin(imgs.mean(axis=(1, 2, 3)))]


def test_lengths_labels_and_items(two_stores):
    paths, imgs, labels = two_stores
    ds = PatchDataset(paths)
    assert len(ds) == 8 and ds.patch_size == 16
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.store_index, [0] * 5 + [1] * 3)
    for i in (0, 4, 5, 7):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and x.min() >= 0 and x.max() <= 1
        assert y.dtype == torch.int64 and y.shape == () and int(y) == labels[i]
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy() * 255, imgs[i], atol=1e-3)


def test_slide_labels(two_stores):
    paths = two_stores[0]
    ds = PatchDataset(paths, label_source="slide", slide_labels=[1, 0])
    np.testing.assert_array_equal(ds.labels, [1] * 5 + [0] * 3)
    with pytest.raises(ValueError, match="needs slide_labels"):
        PatchDataset(paths, label_source="slide")
    with pytest.raises(StoreError, match="b.zarr.*no label"):
        PatchDataset(paths, label_source="slide", slide_labels=[1, None])


def test_store_errors_name_the_store(tmp_path, two_stores):
    unlabelled = write_store(tmp_path / "nolab.h5", random_imgs(2, 16, 2))
    with pytest.raises(StoreError, match="nolab.h5.*no 'labels'"):
        PatchDataset([two_stores[0][0], unlabelled])
    big = write_store(tmp_path / "big.h5", random_imgs(2, 24, 3), [0, 1])
    with pytest.raises(StoreError, match="big.h5.*patch size 24 differs from 16"):
        PatchDataset([two_stores[0][0], big])


def test_ignore_band_leaves_out_mixed_patches(tmp_path):
    imgs = random_imgs(6, 16, 4)
    fraction = np.array([0.0, 0.2, 0.5, 0.8, 1.0, 0.79], np.float32)
    path = write_store(tmp_path / "mixed.h5", imgs, (fraction >= 0.5).astype(int))
    with h5py.File(path, "a") as f:
        f.create_dataset("lesion_fraction", data=fraction)
    ds = PatchDataset([path], transform=None, ignore_band=(0.2, 0.8))
    np.testing.assert_array_equal(ds.patch_index, [0, 1, 3, 4])  # 0.2 and 0.8 are kept: strict band
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
    assert len(ds) == 4 and ds.n_ignored == 2
    np.testing.assert_allclose(ds[2][0].permute(1, 2, 0).numpy() * 255, imgs[3], atol=1e-3)
    assert len(PatchDataset([path])) == 6 and PatchDataset([path]).n_ignored == 0
    unmarked = write_store(tmp_path / "nofrac.h5", imgs, [0] * 6)
    with pytest.raises(StoreError, match="nofrac.h5.*no 'lesion_fraction'.*ignore_band: null"):
        PatchDataset([unmarked], ignore_band=(0.2, 0.8))


def test_ignore_band_config_and_cohort(cohort):
    from wsi_scaat.config import TrainConfig

    assert TrainConfig().ignore_band is None and TrainConfig(ignore_band=[0.3, 0.7]).ignore_band == (0.3, 0.7)
    for bad in ([0.8, 0.2], [0.5, 0.5], [-0.1, 0.5], [0.2]):
        with pytest.raises(ValueError, match="ignore_band"):
            TrainConfig(ignore_band=bad)
    stores = sorted(cohort[1].glob("*.h5"))
    fraction = []
    for path in stores:
        with h5py.File(path, "r") as f:
            fraction.append(f["lesion_fraction"][:])
    fraction = np.concatenate(fraction)
    band = PatchDataset(stores, ignore_band=(0.1, 0.9))
    assert len(band) == int(((fraction <= 0.1) | (fraction >= 0.9)).sum()) and band.n_ignored > 0


def test_empty_split_and_store_handles(two_stores):
    empty = PatchDataset([], label_source="slide", slide_labels=[])
    assert len(empty) == 0 and empty.patch_size is None and empty.labels.dtype == np.int64
    assert list(make_loader(empty, 4, train=True)) == [] and list(make_loader(empty, 4, train=False)) == []
    ds = PatchDataset(two_stores[0], max_open=1)
    assert ds.store_attrs["patch_size"] == 16
    assert torch.equal(ds[7][0], PatchDataset(two_stores[0])[7][0]) and torch.equal(ds[0][0], ds[0][0])
    assert list(ds._handles) == [0]  # least recently used store closed
    ds.close()


def test_workers_read_like_main_process(two_stores):
    ds = PatchDataset(two_stores[0])
    ds[0]  # handles opened in the parent must not leak into forked workers
    single = list(make_loader(ds, 3, train=False))
    multi = list(make_loader(ds, 3, train=False, num_workers=2))
    assert len(single) == len(multi) == 3
    for (x0, y0), (x1, y1) in zip(single, multi, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    clone = pickle.loads(pickle.dumps(ds))  # what spawn-started workers receive
    assert torch.equal(clone[6][0], ds[6][0])


def test_spawn_workers(two_stores):
    ds = PatchDataset(two_stores[0])
    loader = make_loader(ds, 8, train=False, num_workers=1, multiprocessing_context="spawn")
    (x, y), *_ = list(loader)
    assert x.shape == (8, 3, 16, 16) and torch.equal(y, torch.as_tensor(two_stores[2]))


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_same_seed_same_batches(two_stores):
    def loader(seed: int, workers: int = 0):
        aug = build_augment(AugmentConfig(color_jitter=0.2), train=True, seed=0)
        return make_loader(
            PatchDataset(two_stores[0], transform=aug), 3, train=True, seed=seed, num_workers=workers
        )

    a, b = loader(7), loader(7)
    for _ in range(2):
        (xa, ya), (xb, yb) = _epoch(a), _epoch(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and len(ya) == 6  # 8 patches, drop_last
    assert not torch.equal(_epoch(loader(7))[0], _epoch(loader(8))[0])
    assert torch.equal(_epoch(loader(3, 2))[0], _epoch(loader(3, 2))[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_depends_only_on_seed_and_epoch(two_stores, workers):
    def loader():
        aug = build_augment(AugmentConfig(hed_jitter=0.05), train=True)  # unseeded: the loader seeds it
        return make_loader(
            PatchDataset(two_stores[0], transform=aug), 4, train=True, seed=1, num_workers=workers
        )

    straight = loader()
    epochs = [_epoch(straight) for _ in range(3)]
    assert straight.epoch == 3 and not torch.equal(epochs[1][0], epochs[2][0])
    resumed = loader()
    resumed.set_epoch(2)
    x, y = _epoch(resumed)
    assert torch.equal(x, epochs[2][0]) and torch.equal(y, epochs[2][1])


def test_epoch_sampler_orders():
    s = EpochSampler(10, "shuffle", seed=3)
    first, second = list(s), list(s)
    assert sorted(first) == list(range(10)) and first != second and s.epoch == 2
    assert first == s.order(0).tolist() and list(EpochSampler(10, "sequential")) == list(range(10))


def test_drop_last_only_with_a_full_batch(two_stores):
    ds = PatchDataset(two_stores[0])
    assert [len(y) for _, y in make_loader(ds, 3, train=True)] == [3, 3]
    assert [len(y) for _, y in make_loader(ds, 20, train=True)] == [8]
    assert [len(y) for _, y in make_loader(ds, 3, train=False)] == [3, 3, 2]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**40), n_minority=st.integers(1, 100), n=st.sampled_from([1000, 2000]))
def test_balanced_sampler_balances(seed, n_minority, n):
    labels = np.zeros(n, np.int64)
    labels[:n_minority] = 1
    s = EpochSampler(n, "balanced", seed=seed, labels=labels)
    drawn = labels[list(s)]
    assert len(drawn) == n and abs(drawn.mean() - 0.5) < 0.1


def test_balanced_loader(two_stores):
    ds = PatchDataset(two_stores[0])
    loader = make_loader(ds, 4, train=True, balance=True, seed=0)
    assert loader.sampler.mode == "balanced" and sum(len(y) for _, y in loader) == 8


def test_cohort_stores_split_by_slide(cohort, tmp_path):
    manifest, tiles = cohort
    splits = cohort_stores(manifest, tiles)
    entries = {e.slide_id: e for e in read_manifest(manifest)}
    seen = [p.stem for pairs in splits.values() for p, _ in pairs]
    assert sorted(seen) == sorted(entries) and len(set(seen)) == len(seen)
    for split, pairs in splits.items():
        assert all(entries[p.stem].split == split and entries[p.stem].label == lab for p, lab in pairs)
    test_stores = {p for p, _ in splits["test"]}
    train = PatchDataset.from_pairs(splits["train"], label_source="slide")
    assert not test_stores & set(train.paths) and len(train) > 0
    with pytest.raises(StoreError, match=r"synth_\d+\.zarr.*not found"):
        cohort_stores(manifest, tiles, fmt="zarr")


def test_cohort_store_labels(cohort):
    manifest, tiles = cohort
    ds = PatchDataset(sorted(tiles.glob("*.h5")))
    assert ds.patch_size == 48 and set(np.unique(ds.labels)) <= {0, 1} and ds.labels.sum() > 0


# --- augmentations ---------------------------------------------------------------------------------


def test_augment_shape_dtype_and_eval_identity():
    img = random_imgs(1, 32, 4)[0]
    full = AugmentConfig(color_jitter=0.3, hed_jitter=0.05, blur_prob=1.0)
    out = build_augment(full, train=True, seed=0)(img)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    assert build_augment(full, train=False)(img) is img
    assert np.array_equal(build_augment(NO_AUG, train=True)(img), img)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(4, 24))
def test_flips_and_rotations_permute_pixels(seed, size):
    img = random_imgs(1, size, seed)[0]
    out = build_augment(AugmentConfig(color_jitter=0.0), train=True, seed=seed)(img)
    assert out.shape == img.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    rows = lambda a: np.sort(a.reshape(-1, 3).view([("", np.uint8)] * 3), axis=0)  # noqa: E731
    assert np.array_equal(rows(out), rows(img))


def test_augment_seeded_and_flips_independent():
    img = random_imgs(1, 16, 5)[0]
    cfg = AugmentConfig(color_jitter=0.2, hed_jitter=0.05, blur_prob=0.5)
    a, b, c = (build_augment(cfg, train=True, seed=s) for s in (1, 1, 2))
    run_a, run_b = [a(img) for _ in range(6)], [b(img) for _ in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(run_a, run_b, strict=True))
    assert not np.array_equal(run_a[0], c(img))
    a.reseed(1)
    assert np.array_equal(a(img), run_a[0])
    flips = build_augment(AugmentConfig(rotate90=False, color_jitter=0.0), train=True, seed=0)
    views = [img, img[:, ::-1], img[::-1], img[::-1, ::-1]]
    outs = [flips(img) for _ in range(40)]
    outcomes = {next(k for k, v in enumerate(views) if np.array_equal(o, v)) for o in outs}
    assert outcomes == {0, 1, 2, 3}  # Compose(seed=...) would tie the two flips together


def test_hed_jitter_on_he_patch(he_patch):
    aug = build_augment(
        AugmentConfig(flips=False, rotate90=False, color_jitter=0.0, hed_jitter=0.05), True, seed=0
    )
    out = aug(he_patch)
    diff = np.abs(out.astype(int) - he_patch).mean()
    assert out.dtype == np.uint8 and out.shape == he_patch.shape and 0.5 < diff < 60


def test_stain_matrix_usable():
    he = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])  # Ruifrok & Johnston H and E
    he /= np.linalg.norm(he, axis=1, keepdims=True)
    assert stain_matrix_usable(he)
    assert not stain_matrix_usable(np.stack([he[0], he[0]]))  # one colour: parallel vectors
    tilt = np.radians(3.0)  # 3 degrees apart: below the 5-degree floor
    close = np.array([[1.0, 0.0, 0.0], [np.cos(tilt), np.sin(tilt), 0.0]])
    assert not stain_matrix_usable(close)
    assert not stain_matrix_usable(he * 2)  # not unit norm
    assert not stain_matrix_usable(np.array([[np.nan, 0, 1], [0, 1, 0]]))
    assert not stain_matrix_usable(he[:1])


def test_stain_augmentor(he_patch, tmp_path):
    cfg = NO_AUG.model_copy(update={"stain_augmentor": True})
    aug = build_augment(cfg, train=True, seed=0)
    outs = [aug(he_patch) for _ in range(3)]
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == he_patch.shape
        assert 0.5 < np.abs(out.astype(int) - he_patch).mean() < 80
    assert not np.array_equal(outs[0], outs[1])
    again = build_augment(cfg, train=True, seed=0)
    assert np.array_equal(again(he_patch), outs[0])
    white = np.full_like(he_patch, 245)
    flat = np.broadcast_to(np.array([200, 120, 180], np.uint8), he_patch.shape).copy()
    # no tissue / degenerate Macenko fit (one colour, parallel stain vectors): the values pass unchanged
    assert np.array_equal(aug(white), white) and np.array_equal(aug(flat), flat)
    clone = pickle.loads(pickle.dumps(aug))
    assert clone(he_patch).shape == he_patch.shape
    from PIL import Image

    Image.fromarray(he_patch).save(tmp_path / "ref.png")
    ref_cfg = cfg.model_copy(update={"stain_reference": tmp_path / "ref.png"})
    ref_aug = build_augment(ref_cfg, train=True, seed=0)
    assert ref_aug.compose.transforms[0].stain_matrix.shape == (2, 3)
    assert ref_aug(he_patch).shape == he_patch.shape
    with pytest.raises(ValueError, match="stain reference"):
        build_augment(cfg, train=True, stain_reference=white)
