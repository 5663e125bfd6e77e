"""Patch stores: every format and codec round-trips; incomplete stores are refused."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_scaat.errors import StoreError
from wsi_scaat.store import create_store, open_store
from wsi_scaat.store.patch_store import REQUIRED_ATTRS

ATTRS = {k: 1 for k in REQUIRED_ATTRS}


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip", "none"])
def test_round_trip(tmp_path: Path, fmt: str, compression: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / f"s.{fmt}"
    with create_store(path, 5, 16, compression) as writer:
        for i in (4, 0, 2, 1, 3):  # any order
            writer.write_chunk(i, writer.encode(data[i]))
        writer.write_array("coords", np.arange(10, dtype=np.int64).reshape(5, 2))
        writer.set_attrs(ATTRS)
    with open_store(path) as store:
        np.testing.assert_array_equal(store.imgs[:], data)
        assert len(store) == 5 and store.coords.dtype == np.int64


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), create_store(tmp_path / "s.h5", 3, 8) as writer:
        writer.write_array("coords", np.zeros((3, 2), np.int64))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_gzip_store_readable_without_plugin(tmp_path: Path) -> None:
    path = tmp_path / "g.h5"
    with create_store(path, 1, 4, "gzip") as writer:
        writer.write_chunk(0, writer.encode(np.full((4, 4, 3), 7, np.uint8)))
    with h5py.File(path) as f:
        assert f["imgs"].compression == "gzip" and (f["imgs"][0] == 7).all()


def test_refuses_foreign_or_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not found"):
        open_store(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["coords"] = np.zeros((1, 2))
    with pytest.raises(StoreError, match="missing attributes"):
        open_store(tmp_path / "foreign.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="cannot open"):
        open_store(tmp_path / "junk.h5")
