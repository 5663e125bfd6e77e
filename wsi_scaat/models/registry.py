"""Model config, registry and builder: ``Normalize`` then a backbone, so models take [0, 1] RGB input.

Weights are never downloaded: torchvision backbones are built with ``weights=None`` and
``ModelConfig.weights`` names a local file, either a ``state_dict`` (of the whole model, keys
``backbone.*``, or of the backbone alone) or a checkpoint dict holding one under ``"model"``.
Normalisation constants are config, not weights: they are buffers left out of ``state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from wsi_scaat.errors import WsiScaatError
from wsi_scaat.learning_sections import ModelConfig  # noqa: F401 - re-exported
from wsi_scaat.models.small_cnn import SmallCNN

Builder = Callable[["ModelConfig", int], nn.Module]
MODELS: dict[str, Builder] = {}


class ModelWeightsError(WsiScaatError):
    """A weights file is missing, unreadable or does not fit the model."""


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(cfg, num_classes) -> backbone`` to ``MODELS`` under ``name``."""

    def add(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return add


@register("small_cnn")
def _small_cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return SmallCNN(num_classes, width=cfg.width, dropout=cfg.dropout, downsample=cfg.downsample)


@register("resnet18")
def _resnet18(cfg: ModelConfig, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


@register("efficientnet_b0")
def _efficientnet_b0(cfg: ModelConfig, num_classes: int) -> nn.Module:
    from torchvision.models import efficientnet_b0

    return efficientnet_b0(weights=None, num_classes=num_classes)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel of an (N, 3, H, W) input (buffers not saved in ``state_dict``)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PatchClassifier(nn.Sequential):
    """``normalize`` then ``backbone``: logits of (N, 3, H, W) RGB input in [0, 1]."""

    normalize: Normalize
    backbone: nn.Module

    def __init__(self, normalize: Normalize, backbone: nn.Module) -> None:
        super().__init__(OrderedDict(normalize=normalize, backbone=backbone))


def build_model(cfg: ModelConfig, num_classes: int) -> PatchClassifier:
    """Build ``cfg.name`` for ``num_classes`` and load ``cfg.weights`` when given."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; registered: {sorted(MODELS)}")
    model = PatchClassifier(Normalize(cfg.mean, cfg.std), MODELS[cfg.name](cfg, num_classes))
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    return model


def load_weights(model: PatchClassifier, path: Path) -> None:
    """Load a local state_dict or checkpoint (``{"model": state_dict, ...}``) strictly into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise ModelWeightsError(path, "weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelWeightsError(path, f"cannot read weights (torch.load, weights_only=True): {exc}") from exc
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelWeightsError(path, "not a state_dict, nor a checkpoint dict with a 'model' state_dict")
    if state and all(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{label} {items[:3]}{' ...' if len(items) > 3 else ''} ({len(items)})"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatch", shapes),
            )
            if items
        ]
        kind = type(model.backbone).__name__
        raise ModelWeightsError(path, f"does not fit {kind}: " + "; ".join(problems))
    model.backbone.load_state_dict(state, strict=True)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
