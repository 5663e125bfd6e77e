"""OpenSlide backend (SVS, NDPI, MRXS, generic tiled TIFF, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from wsi_scaat.slides.reader import SlideInfo, SlideReader


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


class OpenSlideReader(SlideReader):
    """Reads with ``openslide.OpenSlide``; thread-safe for concurrent ``read_region`` calls."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        mpp = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_X))
        self.info = SlideInfo(
            path=str(path),
            width=int(self._slide.dimensions[0]),
            height=int(self._slide.dimensions[1]),
            level_dimensions=tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=mpp,
            mpp_source="metadata" if mpp else "unknown",
            objective_power=_float_or_none(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown",
            backend=self.name,
        )

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region(location, level, size))
        rgb = rgba[..., :3].copy()
        transparent = rgba[..., 3] == 0  # outside the slide or no tile: white, as on glass
        if transparent.any():
            rgb[transparent] = 255
        return rgb

    def close(self) -> None:
        self._slide.close()
