"""One reader interface over OpenSlide, with tiatoolbox's WSIReader and a plain-image reader (PNG,
JPEG, :mod:`~wsi_scaat.slides.image_backend`) as fallbacks.

Locations are always level-0 pixels ``(x, y)``; sizes are output pixels ``(width, height)``
at the level read. The base class owns level choice, thumbnails and microns-per-pixel;
backends only read pixels.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from wsi_scaat.errors import MppUnknownError, SlideOpenError, SlideReadError

#: Refuse slides whose header claims more pixels than this (guards allocations on hostile files).
MAX_SLIDE_PIXELS = 4 * 10**10
#: Largest region (level pixels per side) read in one call when assembling thumbnails.
REGION_SIDE = 4096


@dataclass(frozen=True)
class SlideInfo:
    """Validated slide metadata; ``mpp`` is level-0 microns per pixel or None when unknown."""

    path: str
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str  # "metadata", "override" or "unknown"
    objective_power: float | None
    vendor: str
    backend: str

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def require_mpp(self) -> float:
        """The level-0 mpp, or an error that says how to supply it."""
        if self.mpp is None:
            raise MppUnknownError(
                self.path,
                "microns-per-pixel unknown (the slide's metadata has none); give it with "
                "--mpp-override X or a manifest column 'mpp'",
            )
        return self.mpp

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.01) -> int:
        """Deepest level whose downsample does not exceed ``downsample`` (within tolerance)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1.0 + tolerance):
                best = level
        return best


def _validate_info(info: SlideInfo) -> SlideInfo:
    if info.width <= 0 or info.height <= 0:
        raise SlideOpenError(info.path, f"invalid dimensions {info.width} x {info.height}")
    if info.width * info.height > MAX_SLIDE_PIXELS:
        raise SlideOpenError(
            info.path,
            f"header claims {info.width} x {info.height} px, above the limit of "
            f"{MAX_SLIDE_PIXELS:.0e} pixels; refusing to read it",
        )
    if info.mpp is not None and not (math.isfinite(info.mpp) and info.mpp > 0):
        info = replace(info, mpp=None, mpp_source="unknown")
    return info


class SlideReader(ABC):
    """A whole-slide image opened for reading; use as a context manager."""

    info: SlideInfo

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Backend read: RGB uint8 array of shape (height, width, 3)."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` pixels at ``level`` whose top-left is ``location`` in level-0 pixels.

        Pixels outside the slide are white. Failures of the codec become ``SlideReadError``.
        """
        if not 0 <= level < self.info.level_count:
            raise ValueError(f"level {level} out of range 0..{self.info.level_count - 1}")
        try:
            return self._read((int(location[0]), int(location[1])), level, (int(size[0]), int(size[1])))
        except (SlideReadError, MemoryError):
            raise
        except Exception as exc:  # codec and backend errors: report the file and the cause
            raise SlideReadError(self.info.path, f"cannot read pixels: {exc}") from exc

    def read_thumbnail(self, downsample: float) -> tuple[np.ndarray, float]:
        """Thumbnail at about ``downsample`` x level 0, assembled region by region.

        Returns the RGB image and its exact downsample relative to level 0. The level is read in
        regions of at most ``REGION_SIDE`` pixels and block-averaged, so memory stays bounded
        even for a slide without a pyramid.
        """
        level = self.info.best_level_for_downsample(downsample)
        level_ds = self.info.level_downsamples[level]
        k = max(1, int(round(downsample / level_ds)))
        lw, lh = self.info.level_dimensions[level]
        tw, th = max(1, lw // k), max(1, lh // k)
        thumb = np.full((th, tw, 3), 255, np.uint8)
        side = max(k, (REGION_SIDE // k) * k)
        for y in range(0, th * k, side):
            for x in range(0, tw * k, side):
                w, h = min(side, tw * k - x), min(side, th * k - y)
                region = self.read_region((int(round(x * level_ds)), int(round(y * level_ds))), level, (w, h))
                if k > 1:
                    region = cv2.resize(region, (w // k, h // k), interpolation=cv2.INTER_AREA)
                thumb[y // k : y // k + h // k, x // k : x // k + w // k] = region
        return thumb, level_ds * k

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"{type(self).__name__}({i.path!r}, {i.width}x{i.height}, levels={i.level_count}, mpp={i.mpp})"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideOpenError(path, "file not found")
    if path.is_dir() and path.suffix.lower() != ".zarr":
        raise SlideOpenError(path, "is a folder, not a slide file")
    if path.is_file() and os.path.getsize(path) == 0:
        raise SlideOpenError(path, "empty file (0 bytes)")


def open_slide(path: str | Path, mpp_override: float | None = None) -> SlideReader:
    """Open a slide with OpenSlide, falling back to tiatoolbox, then to a plain-image reader (PNG,
    JPEG); raise ``SlideOpenError`` if none can.

    ``mpp_override`` replaces the level-0 microns-per-pixel of the metadata.
    """
    from wsi_scaat.slides.image_backend import ImageReader
    from wsi_scaat.slides.openslide_backend import OpenSlideReader
    from wsi_scaat.slides.tiatoolbox_backend import TiatoolboxReader

    path = Path(path)
    _check_file(path)
    causes = []
    for backend in (OpenSlideReader, TiatoolboxReader, ImageReader):
        try:
            reader = backend(path)
        except SlideOpenError:
            raise
        except Exception as exc:
            causes.append(f"{backend.name}: {str(exc) or type(exc).__name__}")
            continue
        try:
            info = reader.info
            if mpp_override is not None:
                if not (mpp_override > 0 and math.isfinite(mpp_override)):
                    raise SlideOpenError(path, f"mpp override must be positive, got {mpp_override}")
                info = replace(info, mpp=float(mpp_override), mpp_source="override")
            reader.info = _validate_info(info)
        except BaseException:
            reader.close()
            raise
        return reader
    raise SlideOpenError(path, "cannot open as a slide (" + "; ".join(causes) + ")")
