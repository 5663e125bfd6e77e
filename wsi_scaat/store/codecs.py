"""Chunk codecs shared by the HDF5 and zarr stores.

Patches are encoded by worker threads (the codecs release the GIL) and written as raw chunks,
so compression runs on every core. Blosc-LZ4 is the default: on H&E patches it compresses
about as well as gzip (1.3x) at ~40x its speed; gzip stays available for readers without
``hdf5plugin``.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from typing import Any

import hdf5plugin
import numcodecs
import numpy as np

COMPRESSIONS = ("lz4", "zstd", "gzip", "none")
_BLOSC = {"lz4": ("lz4", 5), "zstd": ("zstd", 1)}


def chunk_encoder(compression: str, container: str = "h5") -> Callable[[np.ndarray], bytes]:
    """Function turning one patch into the bytes of its stored chunk in ``container`` (h5|zarr)."""
    if compression in _BLOSC:
        cname, level = _BLOSC[compression]
        codec = numcodecs.Blosc(cname=cname, clevel=level, shuffle=numcodecs.Blosc.NOSHUFFLE)
        return lambda a: bytes(codec.encode(np.ascontiguousarray(a)))
    if compression == "gzip" and container == "zarr":  # zarr's GzipCodec writes the gzip format
        return lambda a: gzip.compress(np.ascontiguousarray(a).tobytes(), 1, mtime=0)
    if compression == "gzip":  # HDF5's deflate filter reads the zlib format
        return lambda a: zlib.compress(np.ascontiguousarray(a).tobytes(), 1)
    if compression == "none":
        return lambda a: np.ascontiguousarray(a).tobytes()
    raise ValueError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")


def h5_filter(compression: str) -> dict[str, Any]:
    """``create_dataset`` keyword arguments matching :func:`chunk_encoder`."""
    if compression in _BLOSC:
        cname, level = _BLOSC[compression]
        return dict(hdf5plugin.Blosc(cname=cname, clevel=level, shuffle=hdf5plugin.Blosc.NOSHUFFLE))
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1}
    return {}


def zarr_compressors(compression: str) -> Any:
    """zarr v3 ``compressors`` argument matching :func:`chunk_encoder`."""
    from zarr.codecs import BloscCodec, GzipCodec

    if compression in _BLOSC:
        cname, level = _BLOSC[compression]
        return [BloscCodec(cname=cname, clevel=level, shuffle="noshuffle", typesize=1)]
    if compression == "gzip":
        return [GzipCodec(level=1)]
    return None
