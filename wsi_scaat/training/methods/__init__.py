"""Training methods: each turns a batch into a loss (``Method.step``); see docs/methods.md.

``build_method(name, train_cfg)`` returns the method ``name`` (one of :data:`METHODS`: erm, scaat,
advgrad, sgt) configured from ``train_cfg.<name>``.
"""

from wsi_scaat.training.methods.advgrad import AdvGradConfig, AdvGradMethod, advgrad_delta
from wsi_scaat.training.methods.base import METHODS, Method, StepOutput, build_method, gradient_saliency
from wsi_scaat.training.methods.erm import ErmMethod
from wsi_scaat.training.methods.scaat import (
    ScaatConfig,
    ScaatMethod,
    scaat_effective_ratio,
    scaat_mask_and_budget,
    scaat_perturbation,
)
from wsi_scaat.training.methods.sgt import SgtConfig, SgtMethod, sgt_mask_input

__all__ = [
    "METHODS",
    "AdvGradConfig",
    "AdvGradMethod",
    "ErmMethod",
    "Method",
    "ScaatConfig",
    "ScaatMethod",
    "SgtConfig",
    "SgtMethod",
    "StepOutput",
    "advgrad_delta",
    "build_method",
    "gradient_saliency",
    "scaat_effective_ratio",
    "scaat_mask_and_budget",
    "scaat_perturbation",
    "sgt_mask_input",
]
