"""Per-slide patch stores in HDF5 or zarr v3.

Layout (both formats): ``coords`` (N, 2) int64 top-left x, y at level 0; ``imgs`` (N, P, P, 3)
uint8, one patch per chunk; optional ``labels`` (N,) int64 and ``lesion_fraction`` (N,) float32;
``tissue_mask`` (uint8, the thumbnail mask). Attributes on the root (and, as CLAM and TRIDENT
read them, on ``coords``) describe the geometry: ``patch_size_out`` (P), ``patch_size`` and
``patch_level`` (CLAM's and TRIDENT's reading: ``patch_size`` pixels of level ``patch_level``
cover each patch), ``level0_magnification`` and ``target_magnification`` (TRIDENT's),
``downsample``, ``patch_size_level0``, ``mpp_level0``, ``target_mpp``, ``overlap``, ``slide_width``,
``slide_height``, ``slide_id``, ``source_path``, ``wsi_scaat_version`` and a few more
(``docs/contracts.md``).

Version 1 stores (before ``patch_size_out``) held the output size in ``patch_size``; they stay
readable: :class:`PatchStore` gives them ``patch_size_out`` (their CLAM attributes stay wrong
whenever the tiler resampled: re-tile them for CLAM or TRIDENT).
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter for reading)
import numpy as np

from wsi_scaat.atomic import atomic_output
from wsi_scaat.errors import StoreError
from wsi_scaat.store.codecs import chunk_encoder, h5_filter, zarr_compressors

STORE_VERSION = 2
FORMATS = ("h5", "zarr")
REQUIRED_ATTRS = (
    "patch_size", "patch_level", "downsample", "patch_size_level0", "mpp_level0", "target_mpp",
    "overlap", "slide_width", "slide_height", "slide_id", "source_path", "wsi_scaat_version",
)  # fmt: skip


def store_suffix(fmt: str) -> str:
    """File suffix of a store format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown store format {fmt!r}; choose one of {FORMATS}")
    return "." + fmt


def plain(value: Any) -> Any:
    """An attribute value as a plain JSON type (HDF5 gives NumPy scalars and arrays back)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


class PatchStoreWriter(ABC):
    """Writes one store; ``encode`` is thread-safe, the ``write_*`` methods are not."""

    def __init__(self, path: Path, n: int, patch_size: int, compression: str) -> None:
        self.path, self.n, self.patch_size, self.compression = path, n, patch_size, compression

    @abstractmethod
    def encode(self, patch: np.ndarray) -> bytes:
        """Encode one (P, P, 3) uint8 patch into its chunk bytes (call from any thread)."""

    @abstractmethod
    def write_chunk(self, index: int, chunk: bytes) -> None:
        """Store the encoded patch ``index``."""

    @abstractmethod
    def write_array(self, name: str, data: np.ndarray) -> None:
        """Store a whole small array (coords, labels, masks)."""

    @abstractmethod
    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Set the store's attributes (root, and ``coords`` once written)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and close."""


class H5Writer(PatchStoreWriter):
    """HDF5 writer using direct chunk writes of pre-encoded patches."""

    def __init__(self, path: Path, n: int, patch_size: int, compression: str) -> None:
        super().__init__(path, n, patch_size, compression)
        self._encode = chunk_encoder(compression, "h5")
        self._file = h5py.File(path, "w")
        shape = (n, patch_size, patch_size, 3)
        self._imgs = self._file.create_dataset(
            "imgs", shape=shape, dtype=np.uint8, chunks=(1, *shape[1:]), **h5_filter(compression)
        )

    def encode(self, patch: np.ndarray) -> bytes:
        return self._encode(patch)

    def write_chunk(self, index: int, chunk: bytes) -> None:
        self._imgs.id.write_direct_chunk((index, 0, 0, 0), chunk)

    def write_array(self, name: str, data: np.ndarray) -> None:
        self._file.create_dataset(name, data=data, compression="gzip" if data.size > 1024 else None)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            self._file.attrs[key] = plain(value)
            if "coords" in self._file:
                self._file["coords"].attrs[key] = plain(value)

    def close(self) -> None:
        self._file.close()


class ZarrWriter(PatchStoreWriter):
    """zarr v3 writer; encoded chunks go straight to their files (spec key ``imgs/c/i/0/0/0``)."""

    def __init__(self, path: Path, n: int, patch_size: int, compression: str) -> None:
        import zarr

        super().__init__(path, n, patch_size, compression)
        self._encode = chunk_encoder(compression, "zarr")
        self._root = zarr.open_group(str(path), mode="w", zarr_format=3)
        shape = (n, patch_size, patch_size, 3)
        self._imgs = self._root.create_array(
            "imgs", shape=shape, dtype="uint8", chunks=(1, *shape[1:]),
            compressors=zarr_compressors(compression), fill_value=0,
        )  # fmt: skip

    def encode(self, patch: np.ndarray) -> bytes:
        return self._encode(patch)

    def write_chunk(self, index: int, chunk: bytes) -> None:
        target = self.path / "imgs" / "c" / str(index) / "0" / "0" / "0"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(chunk)

    def write_array(self, name: str, data: np.ndarray) -> None:
        arr = self._root.create_array(name, shape=data.shape, dtype=data.dtype,
                                      chunks=data.shape or None, fill_value=0)  # fmt: skip
        arr[...] = data

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        values = {k: plain(v) for k, v in attrs.items()}
        self._root.attrs.update(values)
        if "coords" in self._root:
            self._root["coords"].attrs.update(values)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def create_store(
    final: str | Path, n: int, patch_size: int, compression: str = "lz4"
) -> Iterator[PatchStoreWriter]:
    """Create a store under a temporary name; it appears at ``final`` only when the block succeeds.

    The format follows the suffix of ``final`` (``.h5`` or ``.zarr``).
    """
    final = Path(final)
    fmt = final.suffix.lstrip(".")
    store_suffix(fmt)
    with atomic_output(final) as tmp:
        writer: PatchStoreWriter = (H5Writer if fmt == "h5" else ZarrWriter)(tmp, n, patch_size, compression)
        try:
            yield writer
        finally:
            writer.close()


class PatchStore:
    """Read access to a patch store; open one per worker process (handles are not fork-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(self.path, "patch store not found")
        self.format = self.path.suffix.lstrip(".")
        try:
            if self.format == "h5":
                self._h = h5py.File(self.path, "r")
                self.attrs = {k: plain(v) for k, v in self._h.attrs.items()}
            elif self.format == "zarr":
                import zarr

                self._h = zarr.open_group(str(self.path), mode="r")
                self.attrs = dict(self._h.attrs)
            else:
                raise StoreError(self.path, f"unknown store format {self.format!r}")
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(self.path, f"cannot open patch store: {exc}") from exc
        try:
            self._check_layout()
        except StoreError:
            self.close()
            raise
        self.coords = np.asarray(self._h["coords"][...], dtype=np.int64)

    def _check_layout(self) -> None:
        """Refuse what is not a patch store this version reads; give version 1 ``patch_size_out``."""
        missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise StoreError(self.path, f"not a wsi-scaat patch store (missing attributes {missing})")
        version = int(self.attrs.get("store_version", 1))
        if version > STORE_VERSION:
            raise StoreError(
                self.path, f"store version {version} is newer than this wsi-scaat reads ({STORE_VERSION})"
            )
        if "imgs" not in self._h:
            raise StoreError(self.path, "not a wsi-scaat patch store (no imgs)")
        side = int(self.imgs.shape[1])
        if version == 1:  # its patch_size was the output size, the side of imgs
            self.attrs.setdefault("patch_size_out", side)
        if "patch_size_out" not in self.attrs:
            raise StoreError(self.path, f"store version {version} without attribute patch_size_out")
        if int(self.attrs["patch_size_out"]) != side:
            raise StoreError(
                self.path, f"patch_size_out {self.attrs['patch_size_out']} differs from the {side}-px imgs"
            )

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __contains__(self, name: str) -> bool:
        return name in self._h

    @property
    def patch_size(self) -> int:
        """Side of the stored patches in pixels (``patch_size_out``; not CLAM's ``patch_size``)."""
        return int(self.attrs["patch_size_out"])

    @property
    def imgs(self) -> Any:
        """Lazy (N, P, P, 3) array; index it to read patches."""
        return self._h["imgs"]

    def array(self, name: str) -> np.ndarray:
        """A whole auxiliary array (``labels``, ``lesion_fraction``, ``tissue_mask``...)."""
        if name not in self._h:
            raise StoreError(self.path, f"has no array {name!r}")
        return np.asarray(self._h[name][...])

    def close(self) -> None:
        if self.format == "h5":
            self._h.close()

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One JSON line with the size and attributes (for ``wsi-scaat info``)."""
        return json.dumps({"path": str(self.path), "n_patches": len(self), **self.attrs})


def open_store(path: str | Path) -> PatchStore:
    """Open a patch store for reading."""
    return PatchStore(path)
