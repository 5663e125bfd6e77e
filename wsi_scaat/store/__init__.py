"""Patch stores: HDF5 (CLAM-compatible ``coords``) and zarr v3, with the same arrays and attributes."""

from wsi_scaat.store.patch_store import (
    STORE_VERSION,
    PatchStore,
    PatchStoreWriter,
    create_store,
    open_store,
    store_suffix,
)

__all__ = [
    "STORE_VERSION",
    "PatchStore",
    "PatchStoreWriter",
    "create_store",
    "open_store",
    "store_suffix",
]
