"""The hard synthetic preset (``synth.difficulty: hard``): lesions told apart by nuclei alone.

What differs between lesion and normal tissue is nuclear morphology only: lesion nuclei are
mostly atypical (larger, pleomorphic, irregular ragged outlines, coarse or vesicular chromatin
with nucleoli; :mod:`wsi_scaat.synth.nuclei`). What does not differ: the stroma (one texture
under the whole tissue), the nuclear area fraction (one smooth cellularity field for both
classes) and hence the mean colour. Every slide has its own hematoxylin and eosin vectors, stain
amounts and white level, mixed in optical-density space (Beer-Lambert), so colour alone separates
nothing. Lesions come in every size, from foci of a few patches to large regions, with ragged
outlines.

Pixels are painted strip by strip, 4096 columns at a time (:class:`HardPainter`); nothing
slide-sized is held in memory except coarse fields of one value per 64-px cell or per nucleus block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import Polygon

from wsi_scaat.synth.geometry import _random_point, _snap
from wsi_scaat.synth.nuclei import (
    ATYPICAL,
    N_JAG,
    N_SHAPE,
    NORMAL_KINDS,
    Nuclei,
    prepared,
    sample_block,
    stamp,
)
from wsi_scaat.synth.render import _CELL, _CHUNK, TEXTURE_PERIODS, _noise, rasterize, stain_field

REF_H = (0.5626, 0.7201, 0.4062)  # reference hematoxylin and eosin OD vectors (Macenko et al.)
REF_E = (0.2159, 0.8012, 0.5581)
BLOCK_UM = 48.0  # side of a nucleus block (um)
GRAIN_PERIOD = 256  # px, chromatin textures
CELLULARITY = (0.07, 0.34)  # range of the nuclear area fraction (both classes)
FOCUS_RADIUS_UM = (30.0, 70.0)  # small foci: a few 48-um patches each
OD_KNEE, OD_CAP = 1.1, 1.6  # optical densities above the knee approach the cap (darkest: white / 40)
MIN_PIECE_UM2 = 300.0  # smaller slivers of a lesion cut by the tissue outline are dropped


@dataclass(frozen=True)
class SlideStain:
    """One slide's stain: unit OD vectors, amounts and the white level (RGB of empty glass)."""

    h: np.ndarray
    e: np.ndarray
    h_amount: float
    e_amount: float
    white: np.ndarray


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.02, None)
    return v / np.linalg.norm(v)


def slide_stain(rng: np.random.Generator) -> SlideStain:
    """Random stain of one slide: vectors tilted around the reference, amounts x0.7-1.3, white ~236-252."""
    return SlideStain(
        h=_unit(np.asarray(REF_H) + rng.normal(0, 0.07, 3)).astype(np.float32),
        e=_unit(np.asarray(REF_E) + rng.normal(0, 0.07, 3)).astype(np.float32),
        h_amount=float(rng.uniform(0.7, 1.3)),
        e_amount=float(rng.uniform(0.7, 1.3)),
        white=np.clip(rng.uniform(236, 252) + rng.normal(0, 3, 3), 228, 255).astype(np.float32),
    )


def cellularity_field(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Smooth nuclear area fraction per block, log-normal-like within ``CELLULARITY``."""
    pad = 12
    field = _noise(rng, (rows + pad, cols + pad), 2.0)[:rows, :cols]
    lo, hi = CELLULARITY
    return np.clip(math.sqrt(lo * hi) * np.exp(0.45 * field), lo, hi)


def ragged_blob(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int = 256) -> Polygon:
    """Star-shaped polygon with a ragged outline: harmonics 2..60 with amplitudes ~ 1/k, jittered."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, min(61, n // 3)):
        r += 0.4 / k * rng.uniform(0.2, 1.0) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r *= 1 + 0.04 * rng.uniform(-1, 1, n)
    r = np.clip(r, 0.3, None)
    e = math.sqrt(rng.uniform(1.0, 1.8))
    poly = Polygon(np.c_[radius * e * r * np.cos(t), radius / e * r * np.sin(t)])
    poly = affinity.rotate(poly, rng.uniform(0, np.pi), origin=(0, 0), use_radians=True)
    return affinity.translate(poly, cx, cy)


def hard_lesion_geometry(rng: np.random.Generator, tissue: Sequence[Polygon], mpp: float) -> list[Polygon]:
    """Lesions of every size inside the tissue: 2-6 small foci plus 1-3 larger ragged regions.

    The regions are drawn to cover 30-70% of the tissue in all (less where they reach past its edge);
    foci have radii of 30-70 um (a few 48-um patches). Centres lie anywhere in the tissue, so that
    lesion and normal patches are as often cut by the tissue edge (a colour cue otherwise).
    """
    t = shapely.union_all(list(tissue))
    coverage = rng.uniform(0.3, 0.7) * t.area
    placed = []
    n_big = int(rng.integers(1, 4))
    shares = rng.dirichlet(np.ones(n_big))
    for share in shares:
        radius = math.sqrt(coverage * share / math.pi)
        cx, cy = _random_point(rng, t)  # anywhere: lesions reach the tissue edge as often as normal tissue
        placed.append(ragged_blob(rng, cx, cy, radius))
    big = shapely.union_all(placed)
    for _ in range(int(rng.integers(2, 7))):
        radius = rng.uniform(*FOCUS_RADIUS_UM) / mpp
        allowed = t.difference(big.buffer(2 * radius))
        cx, cy = _random_point(rng, t if allowed.is_empty else allowed)
        placed.append(ragged_blob(rng, cx, cy, radius, n=128))
    polys = _snap(shapely.union_all(placed).intersection(t))
    polys = [p for p in polys if p.area * mpp * mpp >= MIN_PIECE_UM2] or polys
    if not polys:  # degenerate (tiny) tissue
        p = t.representative_point()
        polys = _snap(p.buffer(max(2.0, math.sqrt(t.area * 0.1 / math.pi))).intersection(t))
    return polys


def _max_extent_um() -> float:
    kinds = [k for _, k in NORMAL_KINDS] + [ATYPICAL]
    harm = sum(2 / (k + 2) for k in range(N_SHAPE)), sum(2 / (k + 2) for k in range(N_SHAPE, N_SHAPE + N_JAG))
    return max(
        k.radius[1] * math.sqrt(k.elong[1]) * (1 + k.irregular * harm[0] + k.jag * harm[1]) for k in kinds
    )


class HardPainter:
    """Paints full-width level-0 strips of a hard-preset slide: ``painter(y0, h) -> (h, W, 3) uint8``."""

    def __init__(
        self,
        width: int,
        height: int,
        tissue: Sequence[Polygon],
        lesions: Sequence[Polygon],
        seed: int,
        mpp: float,
    ):
        self.width, self.height, self.mpp = width, height, mpp
        self.tissue, self.lesions = list(tissue), list(lesions)
        self.tissue_geom, self.lesion_geom = prepared(self.tissue), prepared(self.lesions)
        ss = np.random.SeedSequence([int(seed), 0x4A2D])
        r_stain, r_cell, r_tex, r_grain, r_bg, r_atypia = (np.random.default_rng(s) for s in ss.spawn(6))
        self.seed = int(seed)
        self.stain = slide_stain(r_stain)
        self.block = max(8, int(round(BLOCK_UM / mpp)))
        self.block_rows, self.block_cols = -(-height // self.block), -(-width // self.block)
        self.cellularity = cellularity_field(r_cell, self.block_rows, self.block_cols)
        self.atypia = float(r_atypia.uniform(0.5, 0.85))
        self.margin = int(math.ceil(_max_extent_um() / mpp)) + 3
        self.grain = (_noise(r_grain, GRAIN_PERIOD, 0.35 / mpp), _noise(r_grain, GRAIN_PERIOD, 0.8 / mpp))
        self.eosin, self.hema_bg = [], []
        for p in TEXTURE_PERIODS:  # stroma: identical under lesion and normal tissue
            low = _noise(r_tex, p, 30.0 / mpp)
            fibres = _noise(r_tex, p, 0.6 / mpp, 3.5 / mpp, angle=float(r_tex.uniform(0, np.pi)))
            fine = _noise(r_tex, p, 0.35 / mpp)
            self.eosin.append(0.16 * low + 0.22 * fibres + 0.08 * fine)
            self.hema_bg.append(0.35 * fine + 0.25 * low)
        self.background = _noise(r_bg, 500, 0.8)
        self.stain_field = stain_field(int(ss.generate_state(1)[0]), width, height)
        self.chunk = min(_CHUNK, width)  # columns painted at once (bounded memory on wide slides)
        self._blocks: dict[tuple[int, int], Nuclei] = {}

    def _block(self, by: int, bx: int) -> Nuclei:
        key = (by, bx)
        if key not in self._blocks:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xB10C, by, bx]))
            self._blocks[key] = sample_block(
                rng,
                bx * self.block,
                by * self.block,
                self.block,
                float(self.cellularity[by, bx]),
                self.tissue_geom,
                self.lesion_geom,
                self.atypia,
                self.mpp,
            )
        return self._blocks[key]

    def nuclei_blocks(self, y0: int, h: int, x0: int, w: int) -> list[Nuclei]:
        """The nucleus blocks that can reach the window (generated once, dropped when passed).

        Strips are painted top to bottom: blocks above the window's rows are forgotten.
        """
        lo = max(0, (y0 - self.margin) // self.block)
        hi = min(self.block_rows - 1, (y0 + h + self.margin) // self.block)
        left = max(0, (x0 - self.margin) // self.block)
        right = min(self.block_cols - 1, (x0 + w + self.margin) // self.block)
        for key in [k for k in self._blocks if k[0] < lo]:
            del self._blocks[key]
        return [self._block(by, bx) for by in range(lo, hi + 1) for bx in range(left, right + 1)]

    def _stroma(self, y0: int, h: int, x0: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Eosin and background hematoxylin OD of the window (the same under both classes)."""
        eosin = np.zeros((h, w), np.float32)
        hema = np.zeros((h, w), np.float32)
        for e_tex, h_tex in zip(self.eosin, self.hema_bg, strict=True):
            p = e_tex.shape[0]
            idx = np.ix_((y0 + np.arange(h)) % p, (x0 + np.arange(w)) % p)
            eosin += e_tex[idx]
            hema += h_tex[idx]
        eosin = 0.24 * np.clip(1 + eosin / math.sqrt(2), 0.25, None)
        hema = 0.045 * np.clip(1 + hema / math.sqrt(2), 0.2, None)
        return eosin, hema

    def _window(self, y0: int, h: int, x0: int, w: int, tissue: np.ndarray) -> np.ndarray:
        eosin, hema = self._stroma(y0, h, x0, w)
        nuc = np.zeros((h, w), np.float32)
        cover = np.zeros((h, w), np.float32)
        for nuclei in self.nuclei_blocks(y0, h, x0, w):
            stamp(nuclei, (y0, h, x0, w), nuc, cover, self.grain)
        eosin *= 1 - 0.65 * cover
        np.maximum(hema, nuc, out=hema)
        # local stain intensity: the easy preset's smooth field on 64-px cells, bilinear
        yc = (y0 + np.arange(h) + 0.5) / _CELL + 0.5
        xc = (x0 + np.arange(w) + 0.5) / _CELL + 0.5
        iy, ix = np.floor(yc).astype(np.intp), np.floor(xc).astype(np.intp)
        wy, wx = (yc - iy).astype(np.float32)[:, None], (xc - ix).astype(np.float32)[None, :]
        f = self.stain_field / 128
        rows = f[iy] * (1 - wy) + f[iy + 1] * wy
        factor = rows[:, ix] * (1 - wx) + rows[:, ix + 1] * wx
        s = self.stain
        od = (hema * (s.h_amount * factor))[..., None] * s.h
        od += (eosin * (s.e_amount * factor))[..., None] * s.e
        knee = od > OD_KNEE  # saturate gently: no black pixels, whose log would dominate OD means
        od[knee] = OD_KNEE + (OD_CAP - OD_KNEE) * np.tanh((od[knee] - OD_KNEE) / (OD_CAP - OD_KNEE))
        rgb = s.white * np.power(np.float32(10), -od)
        p = self.background.shape[0]
        bg = self.background[np.ix_((y0 + np.arange(h)) % p, (x0 + np.arange(w)) % p)]
        bg = (s.white - 6)[None, None, :] + 1.3 * bg[..., None]
        out = np.where(tissue[..., None], rgb, bg)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def __call__(self, y0: int, h: int) -> np.ndarray:
        out = np.empty((h, self.width, 3), np.uint8)
        tissue = rasterize(self.tissue, y0, h, 0, self.width)
        for x0 in range(0, self.width, self.chunk):
            w = min(self.chunk, self.width - x0)
            out[:, x0 : x0 + w] = self._window(y0, h, x0, w, tissue[:, x0 : x0 + w])
        return out
