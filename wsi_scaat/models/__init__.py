"""Patch classifiers: ``ModelConfig``, the ``MODELS`` registry and ``build_model``."""

from wsi_scaat.models.registry import (
    MODELS,
    ModelConfig,
    ModelWeightsError,
    Normalize,
    PatchClassifier,
    build_model,
    count_parameters,
    load_weights,
    register,
)
from wsi_scaat.models.small_cnn import SmallCNN

__all__ = [
    "MODELS",
    "ModelConfig",
    "ModelWeightsError",
    "Normalize",
    "PatchClassifier",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "load_weights",
    "register",
]
