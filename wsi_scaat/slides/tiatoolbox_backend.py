"""tiatoolbox backend: files OpenSlide cannot open (e.g. plain non-pyramidal or OME-TIFF)."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wsi_scaat.errors import SlideOpenError
from wsi_scaat.slides.reader import SlideInfo, SlideReader

#: Suffixes handed to tiatoolbox; others (PNG, JPEG) would be loaded whole into memory.
SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".qptiff", ".dcm", ".zarr", ".jp2"}
#: tiatoolbox reads a strip (non-tiled) TIFF whole into memory: refuse larger ones.
MAX_IN_MEMORY_BYTES = 2 * 1024**3


def _tiff_header(path: Path) -> tuple[int, int, bool, float | None] | None:
    """(width, height, tiled, mpp from resolution tags) of a TIFF's first page; None if not a TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            unit = page.tags.get("ResolutionUnit")
            xres = page.tags.get("XResolution")
            mpp = None
            if unit is not None and xres is not None and int(unit.value) in (2, 3):
                num, den = xres.value
                if num > 0 and den > 0:
                    mpp = (25400.0 if int(unit.value) == 2 else 10000.0) * den / num
            return int(page.imagewidth), int(page.imagelength), bool(page.is_tiled), mpp
    except Exception:
        return None


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_saved_level = logging.NOTSET


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence tiatoolbox, which logs guesses (e.g. inferred objective power) on the root logger.

    Errors too (tifffile logs e.g. a truncated file's bad page offsets before raising): what
    fails surfaces as the exception, in one line. Counted, so overlapping scopes in reader
    threads restore the level only when the last ends.
    """
    global _quiet_depth, _saved_level
    root = logging.getLogger()
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _saved_level = root.level
            root.setLevel(logging.CRITICAL)
        _quiet_depth += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                root.setLevel(_saved_level)


class TiatoolboxReader(SlideReader):
    """Reads with ``tiatoolbox.wsicore.WSIReader`` at pyramid levels (``units="level"``)."""

    name = "tiatoolbox"

    def __init__(self, path: Path) -> None:
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"suffix {path.suffix!r} not handled out of core by tiatoolbox")
        header = _tiff_header(path) if path.suffix.lower() in (".tif", ".tiff") else None
        if header and not header[2] and header[0] * header[1] * 3 > MAX_IN_MEMORY_BYTES:
            raise SlideOpenError(
                path,
                f"strip (non-tiled) TIFF of {header[0]} x {header[1]} px would be read whole into "
                "memory; convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)",
            )
        from tiatoolbox.wsicore.wsireader import WSIReader  # its import sets the root level: first

        with _quiet():  # the metadata properties log their guesses lazily
            self._wsi = WSIReader.open(str(path))
            meta = self._wsi.info
            dims, levels, downsamples = meta.slide_dimensions, meta.level_dimensions, meta.level_downsamples
            raw_mpp, objective, vendor = meta.mpp, meta.objective_power, meta.vendor
        mpp = None
        if raw_mpp is not None and np.all(np.isfinite(raw_mpp)):
            mpp = float(np.asarray(raw_mpp, dtype=float).ravel()[0])
        elif header is not None:
            mpp = header[3]  # tiatoolbox's in-memory reader ignores the resolution tags
        self.info = SlideInfo(
            path=str(path),
            width=int(dims[0]),
            height=int(dims[1]),
            level_dimensions=tuple((int(w), int(h)) for w, h in levels),
            level_downsamples=tuple(float(d) for d in downsamples),
            mpp=mpp,
            mpp_source="metadata" if mpp else "unknown",
            objective_power=float(objective) if objective else None,
            vendor=str(vendor or "unknown"),
            backend=self.name,
        )

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        with _quiet():
            img = self._wsi.read_rect(
                location, size, resolution=level, units="level", pad_constant_values=255
            )
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return np.ascontiguousarray(img[..., :3], dtype=np.uint8)

    def close(self) -> None:
        close = getattr(self._wsi, "close", None)
        if callable(close):
            close()
