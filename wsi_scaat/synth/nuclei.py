"""Individually rendered nuclei of the hard synthetic preset.

Nuclei are drawn block by block (square blocks of ``block`` level-0 pixels, each with its own
random stream), so any strip of a slide can be painted without the rest, in any order, with the
same result. In every block nuclei are added until their summed area reaches the local
*cellularity* (nuclear area fraction) times the block area, lesion candidates thinned so that a
block across a lesion border is as full on both sides: the cellularity field is the same for
both tissue classes, so lesion and normal tissue hold the same amount of nuclear material per
area, with the same mean optical density, and differ only in how it is shaped. Whether a nucleus
is of the lesion or the normal kind is decided by its centre: inside a lesion polygon, lesion;
otherwise normal.

Sizes are in micrometres and converted with the slide's microns-per-pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

N_SHAPE = 3  # low harmonics (k = 2..4): shape irregularity
N_JAG = 5  # higher harmonics (k = 5..9): ragged outline
MAX_NUCLEOLI = 2
NUCLEOLUS_PEAK = 0.6  # a nucleolus' peak OD, relative to the nucleus' rim
RIM = (0.5, 0.9)  # relative radii between which a vesicular nucleus' OD rises from its centre's to the rim's
_J = (2 * (RIM[1] ** 3 - RIM[0] ** 3) / 3 - RIM[0] * (RIM[1] ** 2 - RIM[0] ** 2)) / (RIM[1] - RIM[0])
# mean of that profile over the disc (area-weighted): PROFILE_MEAN[0] + PROFILE_MEAN[1] * (centre's OD)
PROFILE_MEAN = (1 - RIM[1] ** 2 + _J, RIM[1] ** 2 - _J)


@dataclass(frozen=True)
class NucleusKind:
    """One kind of nucleus. Radii in um (mean radius; the outline varies around it)."""

    radius: tuple[float, float]  # uniform range of the mean radius
    elong: tuple[float, float]  # uniform range of the axis ratio (long / short)
    irregular: float  # amplitude of harmonics 2..4 of the outline
    jag: float  # amplitude of harmonics 5..9 of the outline
    od: tuple[float, float]  # uniform range of the hematoxylin optical density
    chromatin: float  # amplitude of the chromatin texture (relative)
    coarse: bool  # coarse clumps (True) or fine grain (False)
    vesicular: float  # probability of a pale centre with a dark rim
    nucleoli: float  # probability of each of up to MAX_NUCLEOLI nucleoli


# Normal tissue: lymphocytes, stromal (spindle) and epithelial nuclei: small, smooth, fine chromatin.
NORMAL_KINDS = (
    (0.30, NucleusKind((2.2, 2.9), (1.0, 1.2), 0.03, 0.01, (0.95, 1.15), 0.08, False, 0.0, 0.0)),
    (0.30, NucleusKind((2.7, 3.5), (2.2, 3.6), 0.04, 0.01, (0.75, 0.9), 0.10, False, 0.0, 0.0)),
    (0.40, NucleusKind((3.0, 4.0), (1.0, 1.5), 0.05, 0.015, (0.6, 0.75), 0.12, False, 0.0, 0.05)),
)
# Atypical (lesion) nuclei: large, pleomorphic, irregular and ragged, coarse or vesicular chromatin
# with nucleoli. Their mean optical density is the area-weighted mean of the normal kinds' (0.79), so
# that lesion and normal tissue hold the same hematoxylin per nuclear area.
ATYPICAL = NucleusKind((4.0, 6.5), (1.0, 1.8), 0.16, 0.05, (0.70, 0.89), 0.35, True, 0.5, 0.45)


@dataclass(frozen=True)
class Nuclei:
    """Nuclei of one block, in level-0 pixels: arrays of length n (per-nucleus rows)."""

    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray  # mean radius (px)
    elong: np.ndarray
    angle: np.ndarray
    harm_amp: np.ndarray  # (n, N_SHAPE + N_JAG)
    harm_phase: np.ndarray  # (n, N_SHAPE + N_JAG)
    od: np.ndarray  # OD of the rim: the drawn mean OD over the mean of the nucleus' profile
    chromatin: np.ndarray
    coarse: np.ndarray  # bool
    interior: np.ndarray  # od of the centre relative to the rim (1: not vesicular)
    nucleoli: np.ndarray  # (n, MAX_NUCLEOLI, 3): dx, dy (units of radius), radius (px); 0: none
    lesion: np.ndarray  # bool: centre inside a lesion
    atypical: np.ndarray  # bool: of the atypical kind (only in lesions)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def extent(self) -> np.ndarray:
        """Half side of a square that holds each nucleus (px)."""
        return self.radius * np.sqrt(self.elong) * (1 + self.harm_amp.sum(1)) + 2


def _mean_area(kinds: Sequence[NucleusKind], weights: Sequence[float]) -> float:
    """Mean area (um^2) of a nucleus drawn from ``kinds`` with ``weights`` (radius uniform in range)."""
    areas = [math.pi * (k.radius[0] ** 2 + k.radius[0] * k.radius[1] + k.radius[1] ** 2) / 3 for k in kinds]
    return float(np.dot(areas, weights) / np.sum(weights))


def _kind_params(kinds: Sequence[NucleusKind], which: np.ndarray, u: np.ndarray, mpp: float) -> dict:
    """Per-nucleus parameters of kind ``kinds[which[i]]`` from the uniform draws ``u`` (n, 12)."""

    def pick(f) -> np.ndarray:
        return np.array([f(k) for k in kinds], np.float64)[which]

    r_lo, r_hi = pick(lambda k: k.radius[0]), pick(lambda k: k.radius[1])
    e_lo, e_hi = pick(lambda k: k.elong[0]), pick(lambda k: k.elong[1])
    o_lo, o_hi = pick(lambda k: k.od[0]), pick(lambda k: k.od[1])
    vesicular = u[:, 4] < pick(lambda k: k.vesicular)
    return {
        "radius": (r_lo + (r_hi - r_lo) * u[:, 0]) / mpp,
        "elong": e_lo + (e_hi - e_lo) * u[:, 1],
        "od": o_lo + (o_hi - o_lo) * u[:, 2],
        "irregular": pick(lambda k: k.irregular),
        "jag": pick(lambda k: k.jag),
        "chromatin": pick(lambda k: k.chromatin),
        "coarse": pick(lambda k: k.coarse).astype(bool),
        "interior": np.where(vesicular, 0.3 + 0.2 * u[:, 5], 1.0),
        "nucleoli_p": pick(lambda k: k.nucleoli),
    }


def sample_block(
    rng: np.random.Generator,
    x0: float,
    y0: float,
    block: int,
    cellularity: float,
    tissue,
    lesions,
    atypia: float,
    mpp: float,
) -> Nuclei:
    """Nuclei of the block with top-left (x0, y0), inside ``tissue`` (prepared shapely geometries).

    Candidates are drawn in a fixed amount from ``rng`` whatever the geometry, so a block's nuclei
    depend only on its stream, its cellularity and the polygons. In a lesion, a nucleus is atypical
    with probability ``atypia`` and otherwise one of the normal kinds (infiltrating cells).
    """
    cap = int(math.ceil(1.5 * cellularity * (block * mpp) ** 2 / (math.pi * 2.2**2))) + 8
    pos = rng.uniform(0, block, (cap, 2)) + (x0, y0)
    u = rng.random((cap, 12))
    amp_u = rng.random((cap, N_SHAPE + N_JAG))
    phase = rng.uniform(0, 2 * np.pi, (cap, N_SHAPE + N_JAG))
    nuc_u = rng.random((cap, MAX_NUCLEOLI, 4))
    in_tissue = (
        shapely.contains_xy(tissue, pos[:, 0], pos[:, 1]) if tissue is not None else np.ones(cap, bool)
    )
    in_lesion = (
        shapely.contains_xy(lesions, pos[:, 0], pos[:, 1]) & in_tissue
        if lesions is not None
        else np.zeros(cap, bool)
    )
    # kind: 0..2 normal kinds, 3 atypical
    cum = np.cumsum([w for w, _ in NORMAL_KINDS])
    normal_kind = np.minimum(np.searchsorted(cum / cum[-1], u[:, 3], side="right"), len(NORMAL_KINDS) - 1)
    atypical = in_lesion & (u[:, 6] < atypia)
    kinds = [k for _, k in NORMAL_KINDS] + [ATYPICAL]
    which = np.where(atypical, len(NORMAL_KINDS), normal_kind)
    p = _kind_params(kinds, which, u, mpp)
    # Candidates are uniform in the block; a lesion candidate is kept with probability
    # E[area | normal] / E[area | lesion], so that nuclei per area go as 1 / E[area] and a block
    # that straddles a lesion border holds the same nuclear area fraction on both sides. Candidates
    # are accepted in order until their area reaches the budget (in expectation); heavy overlaps
    # are rejected.
    normal_area = _mean_area([k for _, k in NORMAL_KINDS], [w for w, _ in NORMAL_KINDS])
    lesion_area = atypia * _mean_area([ATYPICAL], [1.0]) + (1 - atypia) * normal_area
    thinned = in_lesion & (u[:, 9] * lesion_area >= normal_area)
    budget = cellularity * block * block
    area = math.pi * p["radius"] ** 2
    reach = p["radius"] * np.sqrt(p["elong"])  # long semi-axis: spindles need room too
    keep = np.zeros(cap, bool)
    total = 0.0
    for i in np.flatnonzero(~thinned):
        if keep.any():
            d = np.hypot(*(pos[keep] - pos[i]).T)
            if (d < 0.8 * (reach[keep] + reach[i])).any():
                continue
        if total + area[i] > budget:  # the last one with a probability that makes the mean exact
            keep[i] = u[i, 8] * area[i] < budget - total
            break
        keep[i] = True
        total += area[i]
    keep &= in_tissue
    k = np.arange(N_SHAPE + N_JAG)
    scale = (
        np.where(k < N_SHAPE, 1.0, 0.0)[None, :] * p["irregular"][:, None]
        + np.where(k < N_SHAPE, 0.0, 1.0)[None, :] * p["jag"][:, None]
    )
    harm_amp = scale * amp_u * (2 / (k + 2))[None, :]
    present = nuc_u[..., 0] < p["nucleoli_p"][:, None]
    ang, rad = 2 * np.pi * nuc_u[..., 1], 0.45 * np.sqrt(nuc_u[..., 2])
    nucleoli = np.stack(
        [rad * np.cos(ang), rad * np.sin(ang), np.where(present, (0.5 + 0.4 * nuc_u[..., 3]) / mpp, 0.0)],
        axis=-1,
    )
    # peak OD such that the nucleus' mean OD (rim profile and nucleoli included) is the drawn one
    mean_profile = PROFILE_MEAN[0] + PROFILE_MEAN[1] * p["interior"]
    mean_profile += NUCLEOLUS_PEAK * 2 * (nucleoli[..., 2] ** 2).sum(1) / p["radius"] ** 2
    od = p["od"] / mean_profile
    return Nuclei(
        x=pos[keep, 0],
        y=pos[keep, 1],
        radius=p["radius"][keep],
        elong=p["elong"][keep],
        angle=np.pi * u[keep, 7],
        harm_amp=harm_amp[keep],
        harm_phase=phase[keep],
        od=od[keep],
        chromatin=p["chromatin"][keep],
        coarse=p["coarse"][keep],
        interior=p["interior"][keep],
        nucleoli=nucleoli[keep],
        lesion=in_lesion[keep],
        atypical=atypical[keep],
    )


def stamp(
    nuclei: Nuclei,
    window: tuple[int, int, int, int],
    hema: np.ndarray,
    cover: np.ndarray,
    grain: tuple[np.ndarray, np.ndarray],
) -> None:
    """Paint ``nuclei`` into ``hema`` (hematoxylin OD) and ``cover`` (nuclear alpha).

    ``window`` = (y0, h, x0, w): both arrays are (h, w) float32 and hold rows y0..y0+h, columns
    x0..x0+w of level 0; they are updated with a per-pixel maximum (overlapping nuclei do not add
    up), so a pixel's value does not depend on the window. ``grain`` holds two periodic
    unit-variance noise textures (fine, coarse) that give the chromatin its texture, indexed by the
    absolute pixel position.
    """
    y0, h, x0, w = window
    ext = nuclei.extent
    k = np.arange(2, 2 + N_SHAPE + N_JAG, dtype=np.float32)
    near = (
        (nuclei.y + ext > y0) & (nuclei.y - ext < y0 + h) & (nuclei.x + ext > x0) & (nuclei.x - ext < x0 + w)
    )
    for i in np.flatnonzero(near):
        cx, cy, e = nuclei.x[i], nuclei.y[i], ext[i]
        c0, c1 = max(int(cx - e), x0), min(int(cx + e) + 1, x0 + w)
        r0, r1 = max(int(cy - e), y0), min(int(cy + e) + 1, y0 + h)
        if c0 >= c1 or r0 >= r1:
            continue
        dx = (np.arange(c0, c1, dtype=np.float32) + 0.5 - cx)[None, :]
        dy = (np.arange(r0, r1, dtype=np.float32) + 0.5 - cy)[:, None]
        ca, sa = math.cos(nuclei.angle[i]), math.sin(nuclei.angle[i])
        s = math.sqrt(nuclei.elong[i])
        u = (dx * ca + dy * sa) / s
        v = (dy * ca - dx * sa) * s
        d = np.hypot(u, v)
        theta = np.arctan2(v, u)
        rt = np.cos(k[:, None, None] * theta[None] + nuclei.harm_phase[i].astype(np.float32)[:, None, None])
        rt = nuclei.radius[i] * (1 + np.tensordot(nuclei.harm_amp[i].astype(np.float32), rt, axes=1))
        alpha = np.clip(rt - d + 0.5, 0, 1)
        if not alpha.any():
            continue
        rho = d / rt
        ramp = np.clip((rho - RIM[0]) / (RIM[1] - RIM[0]), 0, 1)
        profile = nuclei.interior[i] + (1 - nuclei.interior[i]) * ramp
        tex = grain[int(nuclei.coarse[i])]
        p = tex.shape[0]
        noise = tex[np.ix_(np.arange(r0, r1) % p, np.arange(c0, c1) % p)]
        od = nuclei.od[i] * profile * np.clip(1 + nuclei.chromatin[i] * noise, 0.3, 1.7)  # mean 1
        for nx, ny, nr in nuclei.nucleoli[i]:
            if nr > 0:
                ux, uy = nx * nuclei.radius[i], ny * nuclei.radius[i]
                od += nuclei.od[i] * NUCLEOLUS_PEAK * np.exp(-((u - ux) ** 2 + (v - uy) ** 2) / (2 * nr * nr))
        od *= alpha
        rows, cols = slice(r0 - y0, r1 - y0), slice(c0 - x0, c1 - x0)
        np.maximum(hema[rows, cols], od, out=hema[rows, cols])
        np.maximum(cover[rows, cols], alpha, out=cover[rows, cols])


def prepared(polygons: Sequence[Polygon]):
    """Union of ``polygons`` prepared for fast point tests, or None when there are none."""
    if not polygons:
        return None
    geom = shapely.union_all(list(polygons))
    shapely.prepare(geom)
    return geom
