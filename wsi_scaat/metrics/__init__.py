"""Metrics: classification ranking metrics, and (later) interpretability metrics of saliency maps."""

from wsi_scaat.metrics.ranking import auroc

__all__ = ["auroc"]
