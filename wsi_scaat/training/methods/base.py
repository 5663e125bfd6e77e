"""What a training method is: one ``step`` that turns a batch into a loss, plus shared helpers.

A method never touches the optimiser or the parameters' ``.grad``: input gradients are taken with
``torch.autograd.grad(..., inputs=...)`` on a detached copy of the batch, and the training loop
backpropagates the returned loss. Forwards that only search for a perturbation (saliency of a
perturbed input, attack iterations) run with BatchNorm's batch statistics but leave its running
statistics alone (:func:`frozen_bn_stats`); forwards whose outputs enter the loss are ordinary
train-mode forwards.

Under DistributedDataParallel ``model`` is the wrapped model and ``x`` this process's shard of the
global batch. A step makes exactly one forward through ``model`` (the first whose output enters the
loss) and every other forward on ``unwrap(model)``, so DDP prepares one gradient reduction, which
the loop's single ``backward`` runs; input-gradient passes never touch ``.grad`` and so never
trigger it. Random draws shaped as the batch use ``uniform_like_batch``, which gives every sample
the noise a single process would draw for it (both in ``wsi_scaat.training.distributed``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from wsi_scaat.errors import ConfigError

METHODS: dict[str, type[Method]] = {}


@dataclass
class StepOutput:
    """What one training step hands back to the loop."""

    loss: torch.Tensor  # scalar to backpropagate
    logits: torch.Tensor  # (B, K), detached: on the clean inputs when computed, else on the trained inputs
    stats: dict[str, float]  # extra scalars to log


class Method(ABC):
    """A training objective; subclasses with a ``name`` register themselves in :data:`METHODS`."""

    name: ClassVar[str]
    config_key: ClassVar[str | None] = None  # attribute of the train config holding this method's section
    config_class: ClassVar[type[BaseModel] | None] = None
    supports_ddp: ClassVar[bool] = True  # False: training refuses to run it under DistributedDataParallel

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            if name in METHODS:
                raise TypeError(f"training method {name!r} is defined twice")
            METHODS[name] = cls

    def __init__(self, cfg: BaseModel | None = None) -> None:
        if self.config_class is not None:
            cfg = self.config_class() if cfg is None else cfg
            if not isinstance(cfg, self.config_class):
                expected = self.config_class.__name__
                raise TypeError(f"{self.name} expects a {expected}, got {type(cfg).__name__}")
        self.cfg = cfg

    @abstractmethod
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        """The loss of one batch ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg!r})" if self.cfg is not None else f"{type(self).__name__}()"


def build_method(name: str, cfg: Any) -> Method:
    """The method ``name`` configured from ``cfg``'s section of the same name (defaults when absent)."""
    cls = METHODS.get(name)
    if cls is None:
        raise ConfigError(None, f"unknown training method {name!r}; choose one of {sorted(METHODS)}")
    section = getattr(cfg, cls.config_key, None) if cls.config_key else None
    return cls(section)


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, training BatchNorm layers use batch statistics without updating running ones."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
    layers = [m for m in layers if m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def num_selected(fraction: float, n: int) -> int:
    """How many of ``n`` items a ``fraction`` selects: floor(fraction * n), immune to float round-off."""
    return min(n, max(0, math.floor(fraction * n + 1e-9)))


def _sort_keys(scores: torch.Tensor) -> torch.Tensor:
    """Distinct int64 keys per row of (B, N) ``scores`` that order them by (float32 value, index)."""
    bits = (scores.detach().float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed-integer order
    index = torch.arange(scores.shape[1], device=scores.device)
    return (bits.to(torch.int64) << 32) | index


def stable_argsort(scores: torch.Tensor) -> torch.Tensor:
    """Per row of (B, N), the indices by ascending score, ties in index order (as a stable argsort).

    The keys are distinct, so any sort gives this order: on CPU NumPy's vectorised sort (an order of
    magnitude faster than ``torch.argsort`` there), elsewhere ``torch.sort``.
    """
    keys = _sort_keys(scores)
    if keys.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(keys.numpy(), axis=1))
    else:
        ordered = torch.sort(keys, dim=1).values
    return ordered & 0xFFFFFFFF


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest ``scores`` of each row of (B, N); ties go to the lower index."""
    if k <= 0 or k >= scores.shape[1]:
        return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
    keys = _sort_keys(scores)
    if keys.device.type == "cpu":
        kth = torch.from_numpy(np.partition(keys.numpy(), k - 1, axis=1)[:, k - 1 : k])
    else:
        kth = torch.topk(keys, k, dim=1, largest=False).values.amax(1, keepdim=True)
    return keys <= kth


def forward_with_saliency(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, keep_graph: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward on ``x`` and the input gradient of the target logits.

    Returns ``(logits, grad)``: ``logits`` (B, K), still attached to the graph when ``keep_graph``
    (the caller builds its loss on them), and ``grad`` = d f_y(x) / dx (B, C, H, W), signed and
    detached. Only input gradients are computed (no weight-gradient work, nothing written to
    ``.grad``); ``x`` itself is not modified.
    """
    xg = x.detach().requires_grad_(True)
    logits = model(xg)
    target = logits.gather(1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(target, xg, retain_graph=keep_graph)
    return (logits if keep_graph else logits.detach()), grad


def search_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory layout fastest for search passes: channels-last for 4-D CPU batches."""
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16, AVX512-BF16 or AMX CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def search_autocast(x: torch.Tensor, bf16: bool) -> AbstractContextManager[object]:
    """bfloat16 autocast on ``x``'s device when ``bf16``, else a no-op (the caller's precision)."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def gradient_saliency(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels: bool = False
) -> torch.Tensor:
    """|d f_y(x) / dx|: summed over colour channels (B, H, W), or per element (B, C, H, W) if ``channels``."""
    _, grad = forward_with_saliency(model, x, y)
    return grad.abs() if channels else grad.abs().sum(1)


def kl_to_target(
    logits: torch.Tensor, target_probs: torch.Tensor, reduction: str = "batchmean"
) -> torch.Tensor:
    """KL(target || softmax(logits)), computed in float32; ``target_probs`` is treated as a constant."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target_probs.detach().float(), reduction=reduction)


def stats_dict(**values: torch.Tensor | float) -> dict[str, float]:
    """Scalars as Python floats, read back with a single device synchronisation."""
    if not values:
        return {}
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    flat = torch.stack(
        [torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(()) for v in values.values()]
    )
    return dict(zip(values, flat.tolist(), strict=True))
