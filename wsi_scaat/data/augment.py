"""Patch augmentations: flips, 90-degree rotations, colour and stain jitter, blur (albumentations 2).

``build_augment`` returns an :class:`Augment`: a callable ``(P, P, 3) uint8 -> (P, P, 3) uint8``
wrapping an ``albumentations.Compose`` (``.compose``). ``reseed(seed)`` gives all its transforms one
shared numpy and one Python generator seeded from ``seed`` (``build_augment(..., seed=...)`` does it
once; ``make_loader`` does it per epoch and per DataLoader worker, see ``wsi_scaat.data.dataset``),
so the sequence of augmentations is reproducible. Nothing reads the global random state.

Stain augmentation with tiatoolbox (``stain_augmentor=True``): ``StainAugmentor`` (tiatoolbox 2.1)
is a plain class, not an albumentations transform. ``fit(img)`` extracts a Macenko stain matrix from
``img`` unless one was given, then ``augment()`` scales/shifts the stain concentrations. Three
pitfalls, handled here: (1) ``fit`` stores the matrix it extracted, so a reused instance silently
keeps the first image's matrix for every later image; we reset it before each patch; (2) its random
draws use an unseeded ``np.random.default_rng()``; we draw from the Compose's generator instead;
(3) Macenko fails on patches without tissue ("Empty tissue mask computed") and is degenerate on
flat-coloured patches: the two fitted stain vectors coincide (one colour cannot be split into two
stains). Whether a fit is usable is decided from the fitted matrix itself (finite, unit-norm stain
vectors at least ``_MIN_STAIN_ANGLE_DEG`` apart) and from finite concentrations, not from how a
given OpenCV or NumPy release happens to fail; unusable patches pass unchanged.
No reference image is needed: by default the matrix is fitted on each patch itself. With
``stain_reference`` (an RGB image, e.g. a tissue-rich tile of the cohort) one matrix is fitted on it
once at build time and used for every patch: faster, and independent of the patch, but every patch
is then projected onto the reference's stain vectors (a mild stain normalisation). Either way the
output is the patch re-synthesised from two stains, so even zero jitter changes colours slightly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from wsi_scaat.learning_sections import AugmentConfig  # noqa: F401 - re-exported

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would check PyPI at import
import albumentations as A  # noqa: E402

_MAX_CONCENTRATION = 50.0  # optical-density scale: a sane Macenko fit stays far below this
# Haematoxylin and eosin vectors lie about 40 degrees apart (Ruifrok & Johnston: cos 0.76); a fit
# with two vectors closer than this has found one colour, not two stains.
_MIN_STAIN_ANGLE_DEG = 5.0


def stain_matrix_usable(matrix: np.ndarray) -> bool:
    """Whether a (2, 3) Macenko stain matrix holds two distinct, finite, unit-norm stain vectors."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3) or not np.isfinite(m).all():
        return False
    norms = np.linalg.norm(m, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        return False
    cos = float(np.clip(abs(m[0] @ m[1]), 0.0, 1.0))
    return bool(np.degrees(np.arccos(cos)) >= _MIN_STAIN_ANGLE_DEG)


class HEDJitter(A.ImageOnlyTransform):
    """Stain jitter in HED space (Tellez et al., 2018): ``s -> s * alpha + beta`` per channel.

    ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-sigma, sigma)``, drawn per image and
    channel, on the colour deconvolution of ``skimage.color.rgb2hed``.
    """

    def __init__(self, sigma: float = 0.05, p: float = 1.0) -> None:
        super().__init__(p=p)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def get_params(self) -> dict[str, Any]:
        s = self.sigma
        return {
            "alpha": self.random_generator.uniform(1 - s, 1 + s, 3),
            "beta": self.random_generator.uniform(-s, s, 3),
        }

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        from skimage.color import hed2rgb, rgb2hed

        hed = rgb2hed(img) * alpha + beta
        rgb = hed2rgb(hed)
        return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma",)


class TiaStainAugment(A.ImageOnlyTransform):
    """tiatoolbox's Macenko ``StainAugmentor`` as a seeded albumentations transform (see module doc)."""

    def __init__(
        self,
        sigma1: float = 0.4,
        sigma2: float = 0.2,
        reference: np.ndarray | None = None,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.sigma1, self.sigma2 = float(sigma1), float(sigma2)
        self.stain_matrix: np.ndarray | None = None
        self._aug: Any = None
        if reference is not None:
            reference = np.asarray(reference)[..., :3].astype(np.uint8)
            if not self._fit(reference):
                raise ValueError(
                    "cannot fit a Macenko stain matrix on the stain reference (too little tissue?)"
                )
            self.stain_matrix = np.asarray(self._aug.stain_matrix)

    def _augmentor(self) -> Any:
        if self._aug is None:  # built lazily: tiatoolbox is slow to import, and local classes don't pickle
            from tiatoolbox.tools.stainaugment import StainAugmentor

            class _Seeded(StainAugmentor):
                def _sample_params(self) -> None:  # tiatoolbox draws from an unseeded generator
                    self.alpha = self.rng.uniform(1 - self.sigma1, 1 + self.sigma1)
                    self.beta = self.rng.uniform(-self.sigma2, self.sigma2)

            self._aug = _Seeded("macenko", sigma1=self.sigma1, sigma2=self.sigma2, p=1.0)
        return self._aug

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_aug": None}

    def _fit(self, img: np.ndarray) -> bool:
        """Fit the augmentor on ``img``; False when Macenko fails or is degenerate on it."""
        aug = self._augmentor()
        aug.stain_matrix = self.stain_matrix  # ``fit`` overwrites it: reset every time
        try:
            with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
                aug.fit(img)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            return False
        if not stain_matrix_usable(aug.stain_matrix):
            return False
        conc = aug.source_concentrations
        return bool(np.isfinite(conc).all() and np.abs(conc).max() < _MAX_CONCENTRATION)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        if not self._fit(img):
            return img
        self._aug.rng = self.random_generator
        try:
            with np.errstate(over="raise", invalid="raise", under="ignore"):
                return self._aug.augment()
        except FloatingPointError:
            return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma1", "sigma2")


class Augment:
    """``(P, P, 3) uint8 -> (P, P, 3) uint8`` around an albumentations ``Compose`` (``.compose``)."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not self.compose.transforms:
            return image
        return np.ascontiguousarray(self.compose(image=image)["image"])

    def reseed(self, seed: int) -> None:
        """Restart the random stream from ``seed``.

        All transforms share one numpy and one Python generator. (``Compose(seed=...)`` instead gives
        every transform its own generator seeded alike, so e.g. the two flips always fire together.)
        """
        seed = int(seed) % 2**64
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __repr__(self) -> str:
        return f"Augment({self.compose!r})"


def _read_reference(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the stain reference image: {exc}") from exc


def build_augment(
    cfg: AugmentConfig,
    train: bool,
    seed: int | None = None,
    *,
    stain_reference: np.ndarray | None = None,
) -> Augment:
    """The training transform of ``cfg`` (identity when ``train`` is False).

    ``seed`` makes the sequence of augmentations reproducible (None: fresh entropy).
    ``stain_reference`` (RGB array) overrides ``cfg.stain_reference`` for the StainAugmentor.
    """
    transforms: list[Any] = []
    if train:
        if cfg.stain_augmentor:
            if stain_reference is None and cfg.stain_reference is not None:
                stain_reference = _read_reference(cfg.stain_reference)
            transforms.append(TiaStainAugment(0.4, 0.2, reference=stain_reference))
        if cfg.hed_jitter > 0:
            transforms.append(HEDJitter(cfg.hed_jitter))
        if cfg.color_jitter > 0:
            s = cfg.color_jitter
            transforms.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s / 4, p=1.0))
        if cfg.blur_prob > 0:
            transforms.append(A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 1.0), p=cfg.blur_prob))
        if cfg.flips:
            transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        if cfg.rotate90:
            transforms.append(A.RandomRotate90(p=1.0))
    augment = Augment(A.Compose(transforms))
    if seed is not None:
        augment.reseed(seed)
    return augment
