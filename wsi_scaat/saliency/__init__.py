"""Saliency: attribution methods behind one function, and the per-slide patch saliency stage.

``attribute`` and ``ATTRIBUTION_METHODS`` are imported lazily, so that reading a saliency store
(``wsi_scaat.saliency.store``) does not import torch.
"""

from typing import Any

__all__ = ["ATTRIBUTION_METHODS", "attribute"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from wsi_scaat.saliency import attribution

        return getattr(attribution, name)
    raise AttributeError(f"module 'wsi_scaat.saliency' has no attribute {name!r}")
