"""Empirical risk minimisation: plain cross-entropy, the baseline every other method is timed against."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsi_scaat.training.methods.base import Method, StepOutput, stats_dict


class ErmMethod(Method):
    """loss = CE(f(x), y)."""

    name: ClassVar[str] = "erm"

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss=loss, logits=logits.detach(), stats=stats_dict(ce=loss))
