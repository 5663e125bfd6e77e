"""Plain-image backend: PNG and JPEG crops or tissue-microarray cores, read as one-level slides.

These formats have no tiles and no pyramid, so the image is decoded whole, once, on the first read,
and shared by every reader of the same file in the process (the tiler opens one reader per thread).
Images above ``MAX_PIXELS`` are refused with a message saying how to convert them. They carry no
trustworthy resolution (PNG ``pHYs`` and JPEG density are screen dpi, if anything): the level-0 mpp
is unknown and comes from the manifest's ``mpp`` column or ``--mpp-override``.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_scaat.errors import SlideOpenError
from wsi_scaat.slides.reader import SlideInfo, SlideReader

#: File suffixes this backend opens.
SUFFIXES = {".png", ".jpg", ".jpeg"}
#: Largest image decoded into memory (2**27 px: about 11,600 px square, 400 MB as RGB).
MAX_PIXELS = 2**27

_LOCK = threading.Lock()
#: Decoded images shared by the open readers of a file: key -> [image or None, open readers].
_SHARED: dict[tuple[str, int, int], list] = {}


def _key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def decode_rgb(path: Path) -> np.ndarray:
    """The whole image as RGB uint8 (H, W, 3); transparency composited over white, as on glass."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16"):
                grey = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            has_alpha = "A" in img.getbands() or "transparency" in img.info
            if not has_alpha:
                return np.ascontiguousarray(np.asarray(img.convert("RGB")))
            rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.ascontiguousarray(np.round(rgb).astype(np.uint8))


class ImageReader(SlideReader):
    """Reads a PNG or JPEG as a slide of one level; pixels outside the image are white."""

    name = "image"

    def __init__(self, path: Path) -> None:
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"suffix {path.suffix!r} is not a plain image ({', '.join(sorted(SUFFIXES))})")
        try:
            with Image.open(path) as img:
                (width, height), fmt = img.size, str(img.format or "image").lower()
        except Image.DecompressionBombError as exc:
            raise SlideOpenError(path, f"{exc}; convert it to a tiled pyramidal TIFF") from None
        if width * height > MAX_PIXELS:
            raise SlideOpenError(
                path,
                f"plain image of {width} x {height} px would be decoded whole into memory (limit "
                f"{MAX_PIXELS} px); convert it to a tiled pyramidal TIFF (vips tiffsave --tile --pyramid)",
            )
        self._key = _key(path)
        with _LOCK:
            _SHARED.setdefault(self._key, [None, 0])[1] += 1
        self._closed = False
        self.info = SlideInfo(
            path=str(path), width=int(width), height=int(height),
            level_dimensions=((int(width), int(height)),), level_downsamples=(1.0,),
            mpp=None, mpp_source="unknown", objective_power=None, vendor=fmt, backend=self.name,
        )  # fmt: skip

    def _image(self) -> np.ndarray:
        with _LOCK:  # one decode per file, whichever thread asks first
            entry = _SHARED[self._key]
            if entry[0] is None:
                image = decode_rgb(Path(self.info.path))
                if image.shape[:2] != (self.info.height, self.info.width):
                    raise ValueError(
                        f"decoded size {image.shape[1]} x {image.shape[0]} differs from the header's"
                    )
                entry[0] = image
            return entry[0]

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        image = self._image()
        (x, y), (w, h) = location, size
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.info.width), min(y + h, self.info.height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _LOCK:
            entry = _SHARED.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _SHARED[self._key]
