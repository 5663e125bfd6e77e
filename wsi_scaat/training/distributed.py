"""Data-parallel training under ``torchrun``: process group, DDP wrapping, global BatchNorm, collectives.

``torchrun --nproc_per_node N -m wsi_scaat train ...`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set; ``fit`` then trains one model with DistributedDataParallel. The
configured ``train.batch_size`` stays the *global* batch: each rank trains on a contiguous
1/N of every batch that a single process would draw, so a run on N processes follows the
single-process run (up to float rounding; see docs/distributed.md). BatchNorm layers normalise
with the statistics of the global batch (``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm`
elsewhere: torch's ``SyncBatchNorm`` has no CPU kernel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from wsi_scaat.errors import WsiScaatError


class DistributedError(WsiScaatError):
    """A multi-process run is misconfigured (environment, device, batch size)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; the defaults describe a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # set while this module's process group is up

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, records and logs."""
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from the ``torchrun`` environment (single process when unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(None, f"bad WORLD_SIZE, RANK or LOCAL_RANK: {exc}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(None, f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA runs, ``device`` otherwise."""
    if not info.enabled or device.type != "cuda":
        return device
    if info.local_rank >= torch.cuda.device_count():
        raise DistributedError(
            None, f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible"
        )
    return torch.device("cuda", info.local_rank)


def init_process_group(info: DistInfo, device: torch.device, backend: str = "auto") -> DistInfo:
    """Join the job's process group (nccl on CUDA, gloo otherwise, unless ``backend`` names one).

    Returns ``info`` with ``backend`` set when this call created the group (``shutdown`` destroys
    it then); a group that is already up (e.g. made by the caller) is used as it is.
    """
    if not info.enabled:
        return info
    if dist.is_initialized():
        if dist.get_world_size() != info.world_size:
            raise DistributedError(None, "a process group of another size is already initialised")
        return info
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError(None, "train.dist_backend 'nccl' needs train.device cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(minutes=30), **kwargs)
    return DistInfo(info.rank, info.world_size, info.local_rank, backend)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_process_group` created it."""
    if info.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo, device: torch.device) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.enabled:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def shard_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks of ``values`` (float64; unchanged in a single process)."""
    _, world = shard_world()
    if world == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    _, world = shard_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of every rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``t`` over the ranks."""
    return _AllReduceSum.apply(t)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch of all ranks together.

    What ``SyncBatchNorm`` does on CUDA, for any device and backend (gloo on CPU): the mean and
    the (biased, for normalising; unbiased, for the running estimate) variance are reduced over the
    ranks in two passes, with gradients flowing through both reductions. Evaluation, a single
    process, or a layer not tracking running statistics (:func:`frozen_bn_stats`) behave as
    BatchNorm does. The state dict is a BatchNorm's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, world = shard_world()
        if not self.training or world == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dtype, x = x.dtype, x.float()  # statistics in float32, as BatchNorm kernels keep them
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean.reshape(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(dtype)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a :class:`GlobalBatchNorm` sharing its parameters."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm | nn.SyncBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)  # fmt: skip
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_global_bn(child))
    return out


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Global-batch BatchNorm and DistributedDataParallel for a multi-process run; ``model`` otherwise.

    Call before building the optimiser; the parameters are those of ``model``.
    """
    if not info.enabled:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(convert_global_bn(model))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (``model`` itself when not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of rows of ``t`` (the whole of ``t`` in a single process)."""
    rank, world = shard_world()
    if world == 1:
        return t
    b = t.shape[0] // world
    return t[rank * b : (rank + 1) * b]


def uniform_like_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U[0, 1) noise shaped (and laid out) as the batch shard ``x``.

    In a multi-process run the draw is made for the global batch (``world_size`` shards like ``x``)
    from the random stream every rank shares, and this rank keeps its rows: the noise of every
    sample is then the one a single process would draw for it.
    """
    _, world = shard_world()
    if world == 1:
        return torch.empty_like(x).uniform_(0, 1, generator=generator)
    fmt = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    full = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    return shard_rows(full.uniform_(0, 1, generator=generator))
