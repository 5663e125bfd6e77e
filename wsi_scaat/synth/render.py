"""Pixel rendering of synthetic H&E-like slides, strip by strip.

The slide is never held in memory: level 0 is painted in horizontal strips from small
periodic textures (two periods per tissue class, combined with a per-channel minimum so the
repeat is ~1e6 px); :mod:`wsi_scaat.synth.tiff` streams the strips into a pyramidal TIFF.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from PIL import Image, ImageDraw
from scipy import ndimage
from shapely.geometry import Polygon

TEXTURE_PERIODS = (1000, 1029)  # coprime (and FFT-friendly): combined repeat ~1e6 px
BACKGROUND_PERIOD = 500
_CHUNK = 4096  # columns painted at once
_CELL = 64  # px per cell of the stain-intensity field

# per tissue class: stroma RGB, nucleus RGB, nuclei per px^2 (per texture; two textures are
# combined), radius range (px), max elongation, shape irregularity (low harmonics) and
# jaggedness (per vertex), chromatin clumping amplitude
_CLASSES = {
    "normal": dict(
        stroma=(232, 158, 190),
        nucleus=(112, 62, 150),
        density=1 / 560,
        radius=(2.0, 4.0),
        elong=2.2,
        irregular=0.08,
        jag=0.04,
        chromatin=6.0,
    ),
    "lesion": dict(
        stroma=(220, 146, 196),
        nucleus=(72, 30, 110),
        density=1 / 375,
        radius=(5.0, 8.0),
        elong=1.6,
        irregular=0.2,
        jag=0.08,
        chromatin=16.0,
    ),
}
_BACKGROUND = (240, 238, 242)


def _noise(
    rng: np.random.Generator,
    shape: int | tuple[int, int],
    sigma: float,
    sigma2: float | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """Periodic Gaussian-filtered white noise (float32), zero mean, unit std.

    ``sigma`` (and ``sigma2`` with ``angle`` for an anisotropic kernel) in pixels.
    """
    ph, pw = (shape, shape) if isinstance(shape, int) else shape
    ky = np.fft.fftfreq(ph).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(pw).astype(np.float32)[None, :]
    if sigma2 is None:
        q = sigma**2 * (kx**2 + ky**2)
    else:
        u = kx * math.cos(angle) + ky * math.sin(angle)
        v = -kx * math.sin(angle) + ky * math.cos(angle)
        q = sigma**2 * u**2 + sigma2**2 * v**2
    white = rng.random((ph, pw), dtype=np.float32)  # uniform: ~6x faster than normal
    white -= 0.5
    field = sfft.irfft2(sfft.rfft2(white) * np.exp(np.float32(-2 * np.pi**2) * q), s=(ph, pw))
    field -= field.mean()
    field /= field.std() + 1e-12
    return field


def stain_field(seed: int, width: int, height: int) -> np.ndarray:
    """Slide-wide smooth stain-intensity factor (x128) on a grid of 64-px cells.

    Cell (i, j) is centred on level-0 pixel ((j - 0.5) * 64, (i - 0.5) * 64); the field breaks
    up the ~1000 px periodicity of the textures at low magnification.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x57A1]))
    gh, gw = height // _CELL + 3, width // _CELL + 3
    pad = 96  # 3 sigma of the coarsest component: the FFT wrap-around is cropped away
    shape = (gh + pad, gw + pad)
    field = 0.08 * _noise(rng, shape, 6.0) + 0.06 * _noise(rng, shape, 32.0)
    return (np.clip(1 + field[:gh, :gw], 0.75, 1.25) * 128).astype(np.float32)


def _fold(a: np.ndarray, m: int, p: int) -> np.ndarray:
    """Wrap the m-pixel margins of a (p+2m)^2 canvas onto its periodic p x p core."""
    rows = a[m : m + p].copy()
    rows[p - m :] = np.maximum(rows[p - m :], a[:m])
    rows[:m] = np.maximum(rows[:m], a[m + p :])
    core = rows[:, m : m + p].copy()
    core[:, p - m :] = np.maximum(core[:, p - m :], rows[:, :m])
    core[:, :m] = np.maximum(core[:, :m], rows[:, m + p :])
    return core


def _nuclei(rng: np.random.Generator, p: int, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Stamp irregular nuclei on a periodic canvas; return (alpha in [0,1], darkness in [0,1])."""
    n = int(rng.poisson(spec["density"] * p * p))
    rmin, rmax = spec["radius"]
    irr, jag, nv = spec["irregular"], spec["jag"], 16
    m = int(math.ceil(rmax * math.sqrt(spec["elong"]) * (1 + 2 * irr + jag))) + 2
    centre = rng.uniform(0, p, (n, 2)) + m
    th = np.linspace(0, 2 * np.pi, nv, endpoint=False)[None, :]
    shape = 1 + jag * rng.uniform(-1, 1, (n, nv))
    for k in (2, 3):
        shape += irr * rng.uniform(0, 1, (n, 1)) * np.cos(k * th + rng.uniform(0, 2 * np.pi, (n, 1)))
    rad = rng.uniform(rmin, rmax, n)[:, None] * shape
    elong = np.sqrt(rng.uniform(1.0, spec["elong"], n))[:, None]
    ang = rng.uniform(0, np.pi, n)[:, None]
    lx, ly = rad * np.cos(th) * elong, rad * np.sin(th) / elong
    xs = centre[:, :1] + lx * np.cos(ang) - ly * np.sin(ang)
    ys = centre[:, 1:] + lx * np.sin(ang) + ly * np.cos(ang)
    dark = rng.integers(1, 256, n)
    alpha_img = Image.new("L", (p + 2 * m, p + 2 * m), 0)
    dark_img = Image.new("L", (p + 2 * m, p + 2 * m), 0)
    da, dd = ImageDraw.Draw(alpha_img), ImageDraw.Draw(dark_img)
    for i in range(n):
        pts = list(zip(xs[i].tolist(), ys[i].tolist(), strict=True))
        da.polygon(pts, fill=255)
        dd.polygon(pts, fill=int(dark[i]))
    alpha = _fold(np.asarray(alpha_img, np.float32) / 255, m, p)
    darkness = _fold(np.asarray(dark_img, np.float32) / 255, m, p)
    alpha_s = ndimage.gaussian_filter(alpha, 0.6, mode="wrap")
    darkness = ndimage.gaussian_filter(darkness, 0.6, mode="wrap") / np.maximum(alpha_s, 1e-3)
    return np.clip(alpha_s, 0, 1), np.clip(darkness, 0, 1)


def _tissue_texture(rng: np.random.Generator, p: int, spec: dict, tint: np.ndarray) -> np.ndarray:
    """One periodic RGB texture (p x p x 3, uint8) of stroma with nuclei."""
    low = _noise(rng, p, 60.0)
    fibres = _noise(rng, p, 1.2, 7.0, angle=float(rng.uniform(0, np.pi)))
    fine = _noise(rng, p, 0.7)
    clumps = _noise(rng, p, 1.3)
    alpha, darkness = _nuclei(rng, p, spec)
    darkness -= 0.5
    # +8 compensates the darkening caused by taking the minimum of two textures
    stroma_rgb = np.asarray(spec["stroma"], np.float32) + tint + 8
    nucleus_rgb = np.asarray(spec["nucleus"], np.float32) + tint
    chromatin = spec["chromatin"] * np.float32([1.0, 0.8, 0.9])
    out = np.empty((p, p, 3), np.uint8)
    for c, (lo, fi, fn, dk, fs) in enumerate(([4, 7, 3, -36, 5], [6, 10, 3, -28, 4], [3, 6, 3, -30, 5])):
        stroma = low * np.float32(lo)
        stroma += fibres * np.float32(fi)
        stroma += fine * np.float32(fn)
        stroma += stroma_rgb[c]
        nucleus = darkness * np.float32(dk)
        nucleus += fine * np.float32(fs)
        nucleus += clumps * chromatin[c]
        nucleus += nucleus_rgb[c]
        nucleus -= stroma  # blend: stroma + alpha * (nucleus - stroma)
        nucleus *= alpha
        nucleus += stroma
        np.clip(nucleus, 0, 255, out=nucleus)
        np.rint(nucleus, out=nucleus)
        out[..., c] = nucleus
    return out


@lru_cache(maxsize=2)
def build_textures(seed: int, lesion: bool = True) -> dict[str, list[np.ndarray]]:
    """Periodic textures for one slide: {'normal': [A, B], 'lesion': [A, B], 'background': [T]}.

    With ``lesion=False`` the lesion textures are skipped (the others are unchanged).
    Cached; treat the returned arrays as read-only.
    """
    ss = np.random.SeedSequence([int(seed), 0x5E7])
    rng_tint, rng_bg, *rngs = (np.random.default_rng(s) for s in ss.spawn(6))
    tint = rng_tint.normal(0, 3, 3).astype(np.float32)  # mild per-slide stain variation
    tex: dict[str, list[np.ndarray]] = {}
    for ci, (name, spec) in enumerate(_CLASSES.items()):
        if name != "lesion" or lesion:
            tex[name] = [
                _tissue_texture(rngs[2 * ci + j], p, spec, tint) for j, p in enumerate(TEXTURE_PERIODS)
            ]
    bg = np.float32(_BACKGROUND) + _noise(rng_bg, BACKGROUND_PERIOD, 0.8)[..., None] * 1.3
    tex["background"] = [np.clip(np.rint(bg), 0, 255).astype(np.uint8)]
    return tex


def rasterize(polygons: Sequence[Polygon], y0: int, height: int, x0: int, width: int) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside ``polygons`` (even-odd rule).

    The window is rows ``y0..y0+height`` and columns ``x0..x0+width`` of level-0 pixel space;
    pixel (x, y) has its centre at (x + 0.5, y + 0.5).
    """
    segs = []
    for poly in polygons:
        minx, miny, maxx, maxy = poly.bounds
        if maxy <= y0 or miny >= y0 + height or maxx <= x0 or minx >= x0 + width:
            continue
        for ring in (poly.exterior, *poly.interiors):
            c = np.asarray(ring.coords, np.float64)
            segs.append(np.hstack([c[:-1], c[1:]]))
    mask = np.zeros((height, width), bool)
    if not segs:
        return mask
    ax, ay, bx, by = np.concatenate(segs).T
    lo, hi = np.minimum(ay, by), np.maximum(ay, by)
    keep = (hi > y0) & (lo < y0 + height) & (ay != by)
    ax, ay, bx, by, lo, hi = ax[keep], ay[keep], bx[keep], by[keep], lo[keep], hi[keep]
    if ax.size == 0:
        return mask
    yc = (y0 + np.arange(height) + 0.5)[:, None]
    cross = (yc >= lo) & (yc < hi)
    with np.errstate(invalid="ignore"):
        xi = np.where(cross, ax + (yc - ay) * (bx - ax) / (by - ay), np.inf)
    xi.sort(axis=1)
    xi = xi[:, : int(cross.sum(axis=1).max())]
    col = np.clip(np.ceil(xi - 0.5 - x0), 0, width).astype(np.int64)
    starts, ends = col[:, 0::2], col[:, 1::2]
    rows = np.broadcast_to(np.arange(height)[:, None], starts.shape)
    ok = starts < ends
    diff = np.zeros((height, width + 1), np.int8)
    np.add.at(diff, (rows[ok], starts[ok]), 1)
    np.add.at(diff, (rows[ok], ends[ok]), -1)
    np.cumsum(diff, axis=1, dtype=np.int8, out=diff)
    return diff[:, :width] > 0


class StripPainter:
    """Paints full-width level-0 strips of a slide: ``painter(y0, h) -> (h, W, 3) uint8``."""

    def __init__(
        self,
        width: int,
        height: int,
        tissue: Sequence[Polygon],
        lesions: Sequence[Polygon],
        textures: dict[str, list[np.ndarray]],
        stain: np.ndarray | None = None,
    ):
        self.width, self.tissue, self.lesions, self.tex = width, list(tissue), list(lesions), textures
        self.chunk = min(_CHUNK, width)
        self.stain = stain_field(0, width, height) if stain is None else stain
        xc = (np.arange(width) + 0.5) / _CELL + 0.5  # in grid cells
        self.ix = np.floor(xc).astype(np.intp)
        self.wx = (xc - self.ix).astype(np.float32)

    def _rows(self, t: np.ndarray, y0: int, h: int) -> np.ndarray:
        """Rows y0..y0+h of periodic texture t, repeated to width period + chunk."""
        p = t.shape[0]
        block = t[(y0 + np.arange(h)) % p]
        return np.tile(block, (1, -(-(p + self.chunk) // p), 1))

    def __call__(self, y0: int, h: int) -> np.ndarray:
        out = np.empty((h, self.width, 3), np.uint8)
        tmask = rasterize(self.tissue, y0, h, 0, self.width)
        lmask = rasterize(self.lesions, y0, h, 0, self.width)
        cache: dict[str, list[np.ndarray]] = {}
        yc = (y0 + np.arange(h) + 0.5) / _CELL + 0.5
        iy = np.floor(yc).astype(np.intp)
        wy = (yc - iy).astype(np.float32)[:, None]
        stain_rows = self.stain[iy] * (1 - wy) + self.stain[iy + 1] * wy

        def rows(name: str) -> list[np.ndarray]:
            if name not in cache:
                cache[name] = [self._rows(t, y0, h) for t in self.tex[name]]
            return cache[name]

        (bg,) = rows("background")
        pbg = self.tex["background"][0].shape[0]
        flat = out.reshape(h, 3 * self.width)
        for x0 in range(0, self.width, self.chunk):
            w = min(self.chunk, self.width - x0)
            o = flat[:, 3 * x0 : 3 * (x0 + w)]  # a view: rows of interleaved RGB
            np.copyto(o, bg[:, x0 % pbg : x0 % pbg + w].reshape(h, 3 * w))
            tm = tmask[:, x0 : x0 + w]
            if not tm.any():
                continue
            for name, m in (("normal", tm), ("lesion", lmask[:, x0 : x0 + w])):
                if name == "normal" or m.any():
                    a, b = rows(name)
                    pa, pb = (t.shape[0] for t in self.tex[name])
                    mix = np.minimum(a[:, x0 % pa : x0 % pa + w], b[:, x0 % pb : x0 % pb + w])
                    _select(o, mix.reshape(h, 3 * w), m)
            # stain intensity: scale the tissue's "ink" 255 - v by the smooth factor (x128)
            ix, wx = self.ix[x0 : x0 + w], self.wx[x0 : x0 + w]
            factor = stain_rows[:, ix] * (1 - wx) + stain_rows[:, ix + 1] * wx
            ink = np.subtract(255, o, dtype=np.uint16)
            ink *= np.repeat(np.rint(factor).astype(np.uint8), 3, axis=1)
            ink >>= 7
            np.minimum(ink, 255, out=ink)
            np.subtract(255, ink, out=ink)
            _select(o, ink.astype(np.uint8), tm)
        return out


def _select(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> None:
    """dst[mask] = src[mask] for (h, 3w) interleaved-RGB rows and an (h, w) bool mask (fast)."""
    m3 = np.repeat(mask.view(np.uint8), 3, axis=1)
    np.negative(m3, out=m3)  # 1 -> 255
    src = src ^ dst
    src &= m3
    dst ^= src
