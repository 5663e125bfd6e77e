"""Patch datasets, seeded loaders and augmentations (augment loads on first use: albumentations is slow)."""

from __future__ import annotations

from typing import Any

from wsi_scaat.data.dataset import (
    EpochSampler,
    PatchDataset,
    SeededLoader,
    cohort_stores,
    derive_seed,
    make_loader,
    seed_worker,
)

_AUGMENT = ("Augment", "AugmentConfig", "HEDJitter", "TiaStainAugment", "build_augment")

__all__ = [
    "EpochSampler",
    "PatchDataset",
    "SeededLoader",
    "cohort_stores",
    "derive_seed",
    "make_loader",
    "seed_worker",
    *_AUGMENT,
]


def __getattr__(name: str) -> Any:
    if name in _AUGMENT:
        from wsi_scaat.data import augment

        return getattr(augment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
