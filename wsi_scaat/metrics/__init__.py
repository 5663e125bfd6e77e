"""Metrics: classification ranking (AUROC) and interpretability metrics of saliency maps.

Saliency metrics take attributions (B, H, W) or (B, C, H, W) (torch or numpy), are batched in torch and
return one value per map (B,) (ROAD: (B, P)):

* complexity (:mod:`~wsi_scaat.metrics.complexity`): :func:`sparseness_gini`, :func:`complexity_entropy`;
* faithfulness (:mod:`~wsi_scaat.metrics.faithfulness`): :func:`deletion_auc`, :func:`insertion_auc`
  (and their curves), :func:`road`, :func:`road_auc`;
* localisation against a binary mask (:mod:`~wsi_scaat.metrics.localisation`): :func:`pointing_game`,
  :func:`relevance_mass_accuracy`, :func:`relevance_rank_accuracy`, :func:`auroc_localisation`;
* :func:`reconstruction_check` (:mod:`~wsi_scaat.metrics.reconstruction`).
"""

from wsi_scaat.metrics.complexity import complexity_entropy, sparseness_gini
from wsi_scaat.metrics.faithfulness import (
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    noisy_linear_imputation,
    road,
    road_auc,
)
from wsi_scaat.metrics.localisation import (
    auroc_localisation,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from wsi_scaat.metrics.ranking import auroc
from wsi_scaat.metrics.reconstruction import ReconstructionResult, reconstruction_check

__all__ = [
    "ReconstructionResult",
    "auroc",
    "auroc_localisation",
    "complexity_entropy",
    "deletion_auc",
    "deletion_curve",
    "insertion_auc",
    "insertion_curve",
    "noisy_linear_imputation",
    "pointing_game",
    "reconstruction_check",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "road",
    "road_auc",
    "sparseness_gini",
]
