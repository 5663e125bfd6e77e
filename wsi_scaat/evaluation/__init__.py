"""Evaluation of trained models on held-out slides: classification, complexity, faithfulness and
localisation of their saliency maps against ground-truth lesions (``wsi-scaat evaluate``)."""

from wsi_scaat.evaluation.evaluate import PATCH_METRICS, EvaluationError, eval_slides, evaluate_model
from wsi_scaat.evaluation.groundtruth import LesionRegion
from wsi_scaat.evaluation.slide_auroc import auroc_from_histograms, heatmap_histograms

__all__ = [
    "PATCH_METRICS",
    "EvaluationError",
    "LesionRegion",
    "auroc_from_histograms",
    "eval_slides",
    "evaluate_model",
    "heatmap_histograms",
]
