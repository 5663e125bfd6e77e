"""wsi-scaat: whole-slide pipeline for saliency-constrained adaptive adversarial training."""

__version__ = "0.1.0"
