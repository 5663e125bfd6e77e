"""Per-slide saliency stores (zarr v3): patch class probabilities and saliency maps.

``<slide_id>.saliency.zarr`` holds, for the patches of the patch store (same order, same index)
  ``coords``  (N, 2) int64   top-left x, y of each patch in level-0 pixels (from the patch store)
  ``probs``   (N, K) float32 class probabilities of the model
  ``target``  (N,)   int64   class whose saliency was computed (predicted, or a fixed class)
  ``maps``    (N, h, w) float16  |attribution| summed over colour channels, at ``map_downsample``
                                 (h = w = patch_size // map_downsample), chunked by patches
  ``signed``  (N, h, w) float16  the attribution summed over colour channels, sign kept (version 2;
                                 its positive part is the evidence for the target class)
  ``tissue_mask`` (uint8)        the tiling's tissue mask (downsample ``tissue_downsample``)
and, when the stage ran with ``overlap`` > 0, a group ``overlap`` with the same ``coords``, ``probs``,
``target``, ``maps`` and ``signed`` for the extra patches cut between the store's patches (attribute
``n_overlap``). Attributes: every attribute of the patch store (geometry, mpp, slide id...) plus
``saliency_method``, ``saliency_target``, ``map_downsample``, ``map_size``, ``class_names``,
``checkpoint``, ``model_method``, ``saliency_overlap``, ``n_overlap``, ``saliency_version``. A map
pixel covers ``patch_size_level0 / map_size`` level-0 pixels.

Version 1 stores (no ``signed``, no overlap) stay readable; what needs ``signed`` fails naming the
store. The saliency store and the heatmap pyramid built from it are documented in docs/contracts.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_scaat.atomic import atomic_output
from wsi_scaat.errors import StoreError
from wsi_scaat.store.patch_store import plain

SALIENCY_VERSION = 2
SUFFIX = ".saliency.zarr"
MAP_CHUNK = 64  # patches per chunk of ``maps``
OVERLAP_GROUP = "overlap"


class SaliencyWriter:
    """Writes the arrays of a saliency store (or of its ``overlap`` group) opened by
    :func:`create_saliency_store`; ``signed`` arrays only when ``signed`` is true."""

    def __init__(self, root: zarr.Group, n: int, n_classes: int, map_size: int, signed: bool = False) -> None:
        self.root = root
        chunk = max(1, min(MAP_CHUNK, n))
        self.maps = root.create_array("maps", shape=(n, map_size, map_size), dtype="float16",
                                      chunks=(chunk, map_size, map_size), fill_value=0)  # fmt: skip
        self.signed = None
        if signed:
            self.signed = root.create_array("signed", shape=(n, map_size, map_size), dtype="float16",
                                            chunks=(chunk, map_size, map_size), fill_value=0)  # fmt: skip
        self.probs = root.create_array("probs", shape=(n, n_classes), dtype="float32",
                                       chunks=(max(1, min(65536, n)), n_classes), fill_value=0)  # fmt: skip
        self.target = root.create_array("target", shape=(n,), dtype="int64",
                                        chunks=(max(1, min(65536, n)),), fill_value=0)  # fmt: skip

    def write(self, start: int, maps: np.ndarray, probs: np.ndarray, target: np.ndarray,
              signed: np.ndarray | None = None) -> None:  # fmt: skip
        """Write patches ``start .. start + len(maps)`` (best aligned to ``MAP_CHUNK``)."""
        stop = start + len(maps)
        self.maps[start:stop] = maps.astype(np.float16)
        if self.signed is not None:
            if signed is None:
                raise ValueError("this store keeps signed maps: pass signed=")
            self.signed[start:stop] = signed.astype(np.float16)
        self.probs[start:stop] = probs.astype(np.float32)
        self.target[start:stop] = target.astype(np.int64)

    def write_array(self, name: str, data: np.ndarray) -> None:
        arr = self.root.create_array(name, shape=data.shape, dtype=data.dtype,
                                     chunks=data.shape or None, fill_value=0)  # fmt: skip
        arr[...] = data

    def overlap(self, n: int, n_classes: int, map_size: int) -> SaliencyWriter:
        """A writer for the ``overlap`` group of ``n`` extra patches (same arrays as the root)."""
        self.root.attrs["n_overlap"] = int(n)
        group = self.root.create_group(OVERLAP_GROUP)
        return SaliencyWriter(group, n, n_classes, map_size, signed=self.signed is not None)


@contextlib.contextmanager
def create_saliency_store(
    final: str | Path, n: int, n_classes: int, map_size: int, attrs: dict[str, Any], *, signed: bool = False
) -> Iterator[SaliencyWriter]:
    """Create ``final`` under a temporary name; it appears only when the block succeeds."""
    with atomic_output(final) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update({k: plain(v) for k, v in attrs.items()} | {"saliency_version": SALIENCY_VERSION})
        yield SaliencyWriter(root, n, n_classes, map_size, signed=signed)


class SaliencyStore:
    """Read access to a saliency store."""

    REQUIRED = ("coords", "maps", "probs", "target")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(self.path, "saliency store not found")
        try:
            self.root = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:
            raise StoreError(self.path, f"cannot open saliency store: {exc}") from exc
        missing = [k for k in self.REQUIRED if k not in self.root]
        if missing or "saliency_version" not in self.root.attrs:
            raise StoreError(self.path, f"not a wsi-scaat saliency store (missing {missing or 'attributes'})")
        self.attrs = dict(self.root.attrs)
        self.coords = np.asarray(self.root["coords"][...], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def maps(self) -> zarr.Array:
        """Lazy (N, h, w) float16 maps."""
        return self.root["maps"]

    @property
    def signed(self) -> zarr.Array:
        """Lazy (N, h, w) float16 signed maps; ``StoreError`` for a store made without them."""
        return signed_maps(self.root, self.path)

    def array(self, name: str) -> np.ndarray:
        """A whole small array (``probs``, ``target``, ``tissue_mask``)."""
        if name not in self.root:
            raise StoreError(self.path, f"has no array {name!r}")
        return np.asarray(self.root[name][...])

    def target_probability(self) -> np.ndarray:
        """(N,) float64: each patch's probability of its saliency target class."""
        return target_probability(self.root)

    @property
    def map_pixel_level0(self) -> float:
        """Level-0 pixels covered by one map pixel."""
        return float(self.attrs["patch_size_level0"]) / float(self.attrs["map_size"])


def signed_maps(group: zarr.Group, path: Path) -> zarr.Array:
    """The ``signed`` array of a store (or its overlap group), or a ``StoreError`` saying how to get it."""
    if "signed" not in group:
        version = zarr.open_group(str(path), mode="r").attrs.get("saliency_version", "?")
        raise StoreError(path, f"has no signed maps (saliency store version {version}); re-run the saliency "
                               "stage with this version of wsi-scaat to map evidence")  # fmt: skip
    return group["signed"]


def target_probability(group: zarr.Group) -> np.ndarray:
    """(N,) float64: ``probs[i, target[i]]`` of a store or its overlap group."""
    target = np.asarray(group["target"][...], dtype=np.int64)
    probs = np.asarray(group["probs"][...], dtype=np.float64).reshape(len(target), -1)
    return probs[np.arange(len(target)), target] if len(target) else np.zeros(0)


def open_saliency_store(path: str | Path) -> SaliencyStore:
    """Open a saliency store for reading."""
    return SaliencyStore(path)
