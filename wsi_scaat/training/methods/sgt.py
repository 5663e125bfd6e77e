"""Saliency guided training (Ismail, Corrada Bravo & Feizi, NeurIPS 2021).

The input features (individual elements of C x H x W) with the lowest |d f_y / dx| are replaced by
uniform noise in [0, 1], and the model is asked to predict the same distribution on the masked
input: loss = CE(f(x), y) + lam * KL(f(x) || f(x_masked)), clean distribution detached.
See docs/methods.md.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsi_scaat.learning_sections import SgtConfig  # noqa: F401 - re-exported
from wsi_scaat.training.distributed import uniform_like_batch, unwrap
from wsi_scaat.training.methods.base import (
    Method,
    StepOutput,
    forward_with_saliency,
    kl_to_target,
    lowest_k_mask,
    num_selected,
    stats_dict,
)


def sgt_mask_input(
    x: torch.Tensor, saliency: torch.Tensor, mask_fraction: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x`` with its floor(mask_fraction * C*H*W) lowest-|saliency| elements per sample set to U[0, 1].

    ``saliency`` has the shape of ``x``; ties go to the lower flat index (stable sort).
    """
    b = x.shape[0]
    k = num_selected(mask_fraction, x[0].numel())
    replace = lowest_k_mask(saliency.detach().abs().reshape(b, -1), k).reshape(x.shape)
    replace = torch.empty_like(x, dtype=torch.bool).copy_(replace)  # in x's memory format, as the output
    noise = uniform_like_batch(x, generator)  # keeps x's memory format
    return torch.where(replace, noise, x)


class SgtMethod(Method):
    """loss = CE(f(x), y) + lam * KL(f(x) || f(x_masked))."""

    name: ClassVar[str] = "sgt"
    config_key: ClassVar[str | None] = "sgt"
    config_class = SgtConfig
    cfg: SgtConfig

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        cfg = self.cfg
        if num_selected(cfg.mask_fraction, x[0].numel()) == 0 or cfg.lam == 0:
            logits = model(x)  # nothing is masked: the KL term is 0, skip its cost
            ce = F.cross_entropy(logits, y)
            return StepOutput(ce, logits.detach(), stats_dict(ce=ce, kl=0.0))
        logits, grad = forward_with_saliency(model, x, y)
        ce = F.cross_entropy(logits, y)
        target = F.softmax(logits.detach().float(), dim=1)
        kl = kl_to_target(unwrap(model)(sgt_mask_input(x, grad, cfg.mask_fraction)), target)
        loss = ce + cfg.lam * kl
        return StepOutput(loss, logits.detach(), stats_dict(ce=ce, kl=kl))
