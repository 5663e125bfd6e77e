"""Training over thousands of patch stores: each process keeps at most ``train.max_open_stores`` open.

The bound must not change what a loader yields: the same samples, in the same order, as with every
store left open. 3,000 stores are read under ``ulimit -n 256`` in a subprocess (the limit set with
``resource.setrlimit`` in the child), where leaving them open fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi_scaat.config import validate_config
from wsi_scaat.data import PatchDataset, build_augment, make_loader
from wsi_scaat.data.augment import AugmentConfig
from wsi_scaat.store.patch_store import REQUIRED_ATTRS

from conftest import REPO

N_STORES, LIMIT, PATCH, BATCH = 3000, 256, 4, 64


def _patches(k: int) -> np.ndarray:
    """The 2 patches of store ``k``: channels 0 and 1 hold ``k`` (low, high byte), 2 the patch index."""
    imgs = np.zeros((2, PATCH, PATCH, 3), np.uint8)
    imgs[..., 0], imgs[..., 1] = k % 256, k // 256
    imgs[1, ..., 2] = 1
    return imgs


def _write(path: Path, k: int) -> Path:
    with h5py.File(path, "w") as h5:
        h5["imgs"] = _patches(k)
        h5["coords"] = np.zeros((2, 2), np.int64)
        h5["labels"] = np.array([k % 2, 1], np.int64)
        for key in REQUIRED_ATTRS:
            h5.attrs[key] = 1
        h5.attrs["patch_size"] = PATCH
    return path


@pytest.fixture(scope="module")
def many_stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("many_stores")
    return [_write(folder / f"s{k:04d}.h5", k) for k in range(N_STORES)]


def _open_h5() -> int:
    """HDF5 files this process has open (its file descriptors)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd).endswith(".h5")) if fds.is_dir() else 0


def _epochs(ds: PatchDataset, workers: int, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(ds, 8, train=True, balance=True, seed=7, num_workers=workers)
    out = []
    for _ in range(epochs):
        for x, y in loader:
            out.append((x, y))
            if workers == 0:
                assert len(ds._handles) <= ds.max_open
                assert _open_h5() <= ds.max_open or not Path("/proc/self/fd").is_dir()
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_bounded_handles_give_the_same_batches(many_stores: list[Path], workers: int) -> None:
    paths = many_stores[:40]
    aug = AugmentConfig(flips=True, rotate90=True, color_jitter=0.1)

    def dataset(max_open: int) -> PatchDataset:
        return PatchDataset(paths, transform=build_augment(aug, train=True, seed=3), max_open=max_open)

    bounded, unbounded = _epochs(dataset(3), workers), _epochs(dataset(10_000), workers)
    assert len(bounded) == len(unbounded) == 2 * (80 // 8)
    for (xa, ya), (xb, yb) in zip(bounded, unbounded, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, hard))
    from wsi_scaat.data import PatchDataset, make_loader

    paths = [Path(p) for p in Path(sys.argv[1]).read_text().splitlines()]
    ds = PatchDataset(paths, max_open=int(sys.argv[2]))
    loader = make_loader(ds, {batch}, train=True, balance=True, seed=5, num_workers=int(sys.argv[3]))
    seen = []
    for x, y in loader:  # which store and patch each sample came from, read from its pixels
        px = (x[:, :, 0, 0] * 255).round().long()
        seen += [[int(a), int(b)] for a, b in zip(px[:, 0] + 256 * px[:, 1], px[:, 2])]
    print(json.dumps(seen))
    """
)


def _child(list_file: Path, max_open: int, workers: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = CHILD.format(limit=LIMIT, batch=BATCH)
    cmd = [sys.executable, "-c", code, str(list_file), str(max_open), str(workers)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_3000_stores_under_ulimit_256(many_stores: list[Path], tmp_path: Path) -> None:
    list_file = tmp_path / "stores.txt"
    list_file.write_text("\n".join(map(str, many_stores)))
    # what the loader must yield: the sampler's items, in its order (whatever stays open)
    ds = PatchDataset(many_stores)
    items = list(make_loader(ds, BATCH, train=True, balance=True, seed=5).sampler)
    expected = [[int(ds.store_index[i]), int(ds.patch_index[i])] for i, _ in items]
    expected = expected[: len(expected) // BATCH * BATCH]  # the last incomplete batch is dropped

    max_open = validate_config({"cohort": {"name": "c", "manifest": "m.csv"}}).train.max_open_stores
    run = _child(list_file, max_open, workers=2)  # the default bound, in each of two workers
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == expected and len(expected) == 5952

    unbounded = _child(list_file, N_STORES, workers=0)  # the control: every store left open
    assert unbounded.returncode != 0 and "Too many open files" in unbounded.stderr, unbounded.stderr[-3000:]


def test_train_config_sets_the_bound(tiny_cohort: dict) -> None:
    from wsi_scaat.training.trainer import build_job

    def job(max_open: int | None) -> object:
        train = {**tiny_cohort["train"]} | ({} if max_open is None else {"max_open_stores": max_open})
        return build_job(validate_config({**tiny_cohort, "train": train}), "erm", show_progress=False)

    default, two = job(None), job(2)
    assert default.train_loader.dataset.max_open == default.val_loader.dataset.max_open == 128
    assert two.train_loader.dataset.max_open == two.val_loader.dataset.max_open == 2
    assert default.train_hash == two.train_hash  # no effect on results: a resumed run may change it
