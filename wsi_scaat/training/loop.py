"""The training loop shared by every method; a method only decides how the loss is formed.

``fit`` trains one model: seeded (and deterministic on CPU, bfloat16 included), AdamW or SGD with
a cosine schedule, mixed precision and channels_last where the device gains from them (see
:func:`make_runtime`), a checkpoint after every epoch (``last.pt``, and ``best.pt`` when the
validation metric improves), ``metrics.csv`` and ``curves.png``. A run resumed from ``last.pt``
continues exactly where the interrupted one stopped: every epoch reseeds all random streams from
``(seed, epoch)``, and the checkpoint records the precision it was trained in. Under ``torchrun``
each process trains on its shard of every global batch (see ``wsi_scaat.training.distributed``);
the epoch's records are reduced over the processes and rank 0 alone writes them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wsi_scaat import __version__
from wsi_scaat.atomic import link_or_copy
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.metrics import auroc
from wsi_scaat.training import distributed
from wsi_scaat.training.checkpoint import load_checkpoint, save_checkpoint
from wsi_scaat.training.methods.base import fast_bf16
from wsi_scaat.training.reporting import write_curves, write_metrics_csv


class TrainingError(WsiScaatError):
    """Training cannot go on (non-finite loss, no data, unusable device...)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError(None, "train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random streams."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's random streams: a function of the run's seed and the epoch only."""
    return (seed * 1_000_003 + epoch * 7919) % 2**31


Switch = bool | str  # True, False or "auto"


@dataclass
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for full precision
    channels_last: bool

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def precision(self) -> dict[str, Any]:
        """What a checkpoint records of the arithmetic: autocast dtype (or float32) and memory layout."""
        dtype = "float32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        return {"autocast": dtype, "channels_last": self.channels_last}


def amp_dtype(device: torch.device, amp: Switch, *, fp16: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: float32).

    ``auto``: bfloat16 where the device computes it natively (CUDA with bf16, AVX512-BF16 or AMX
    CPUs); elsewhere float16 on CUDA when ``fp16`` (training, with loss scaling), else float32.
    ``True``: bfloat16, or float16 on a CUDA device without bf16 when ``fp16``. ``False``: float32.
    """
    if amp is False or device.type not in ("cuda", "cpu"):
        return None
    if amp == "auto" and not fast_bf16(device):
        return torch.float16 if fp16 and device.type == "cuda" else None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16 if fp16 else None
    return torch.bfloat16


def use_channels_last(device: torch.device, channels_last: Switch) -> bool:
    """Whether 4-D batches and the model go channels-last: ``auto`` on CUDA and on CPUs with oneDNN."""
    if channels_last == "auto":
        return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())
    return bool(channels_last) and device.type in ("cuda", "cpu")


def make_runtime(device: torch.device, amp: Switch, channels_last: Switch) -> Runtime:
    """The runtime of ``train.amp`` and ``train.channels_last`` on ``device`` (see :func:`amp_dtype`)."""
    return Runtime(device, amp_dtype(device, amp), use_channels_last(device, channels_last))


def build_optimizer(model: nn.Module, tc: Any) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) from the train config."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True, weight_decay=tc.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> Any:
    """Linear warm-up then cosine decay to zero, stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    method: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    rt: Runtime,
    epoch: int,
    show_progress: bool | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean loss, accuracy and method statistics.

    In a multi-process run the means are over the samples of all processes.
    """
    model.train()
    n = correct = 0
    total_loss = 0.0
    stats: dict[str, float] = {}
    disable = None if show_progress is None else not show_progress  # None: only on a terminal
    bar = tqdm(loader, desc=f"epoch {epoch + 1} [{method.name}]", unit="batch", leave=False, disable=disable)
    for step, (x, y) in enumerate(bar):
        x, y = rt.to_device(x), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            out = method.step(model, x, y, epoch + step / max(1, len(loader)))
        if not torch.isfinite(out.loss):
            raise TrainingError(
                None,
                f"non-finite loss ({out.loss.item()}) at epoch {epoch + 1}, step {step + 1} "
                f"(method {method.name}); lower train.lr or check the inputs",
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        b = y.shape[0]
        n += b
        total_loss += out.loss.item() * b
        correct += (out.logits.argmax(1) == y).sum().item()
        for key, value in out.stats.items():
            stats[key] = stats.get(key, 0.0) + float(value) * b
        bar.set_postfix(loss=f"{total_loss / n:.4f}", acc=f"{correct / n:.3f}", refresh=False)
    n, total_loss, correct, *sums = distributed.all_sum([n, total_loss, correct, *stats.values()], rt.device)
    stats = dict(zip(stats, sums, strict=True))
    if n == 0:
        raise TrainingError(None, "the training loader yielded no batch (too few training patches?)")
    return {
        "train_loss": total_loss / n,
        "train_accuracy": correct / n,
        **{f"train_{k}": v / n for k, v in stats.items()},
    }


@torch.no_grad()
def predict(model: nn.Module, loader: Any, rt: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) and labels (N,) over ``loader``, in eval mode."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        with rt.autocast():
            logits = model(rt.to_device(x))
        probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
        labels.append(y.numpy())
    if not probs:
        return np.zeros((0, 0)), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model: nn.Module, loader: Any, rt: Runtime) -> dict[str, float]:
    """Validation loss, accuracy and AUROC (NaN when the split is empty or has one class).

    In a multi-process run each process predicts its block of ``loader``'s batches (pass the
    unwrapped model) and the metrics are those of all the blocks together, on every process.
    """
    probs, labels = predict(model, loader, rt)
    parts = [part for part in distributed.all_gather_objects((probs, labels)) if len(part[1])]
    if len(parts) > 1:
        probs, labels = np.concatenate([p for p, _ in parts]), np.concatenate([lab for _, lab in parts])
    if not len(labels):
        return {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_auroc": float("nan")}
    p = torch.from_numpy(probs).clamp_min(1e-12)
    loss = F.nll_loss(p.log(), torch.from_numpy(labels)).item()
    return {
        "val_loss": loss,
        "val_accuracy": float((probs.argmax(1) == labels).mean()),
        "val_auroc": auroc(probs, labels),
    }


def _score(row: dict[str, float], select_by: str) -> tuple[float, float]:
    """Sort key of an epoch (higher is better): the selection metric, then the validation loss.

    The loss breaks ties, e.g. between epochs whose AUROC has saturated at 1; a metric that is NaN
    (AUROC on a one-class split) falls back to accuracy. ``last``: every epoch beats the ones before.
    """
    if select_by == "last":
        return float(row["epoch"]), 0.0
    value = row.get(select_by, float("nan"))
    if select_by == "val_loss":
        value = -value
    if math.isnan(value):
        value = row.get("val_accuracy", float("nan"))
    loss = row.get("val_loss", float("nan"))
    return (-math.inf if math.isnan(value) else value, -math.inf if math.isnan(loss) else -loss)


Logger = Callable[[str], None]


def _kept_best(out_dir: Path, epoch: int) -> Path:
    """Undeclared copy of ``best.pt`` made at ``epoch``, kept while ``last.pt`` names that best epoch.

    Snakemake deletes a job's declared outputs (``best.pt``) before re-running it; a resumed run
    restores ``best.pt`` from this copy.
    """
    return out_dir / f"best-epoch{epoch}.pt"


def _resume_refusal(state: dict, job: Any, out_dir: Path, restore: bool = True) -> str | None:
    """Why ``out_dir/last.pt`` (``state``) cannot be continued; None when it can (``best.pt`` then exists,
    restored from its kept copy when ``restore``: rank 0 alone writes)."""
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    if state.get("train_hash") != job.train_hash:
        return "was made with other settings"
    if state.get("precision") != job.rt.precision:
        return f"was trained in another precision ({state.get('precision')}, this run: {job.rt.precision})"
    stores = [Path(p) for loader in (job.train_loader, job.val_loader)
              for p in getattr(getattr(loader, "dataset", None), "paths", ())]  # fmt: skip
    if any(p.stat().st_mtime_ns > last.stat().st_mtime_ns for p in stores):
        return "predates the patch stores"
    records = (best, out_dir / "metrics.csv", out_dir / "curves.png")
    if int(state["epoch"]) >= job.cfg.train.epochs and not all(p.is_file() for p in records):
        return "ends a finished run whose outputs were removed (a forced re-run)"
    kept = _kept_best(out_dir, int(state["best_epoch"]))
    if not best.is_file():
        if not kept.is_file():
            return "has no best.pt to go with it"
        if restore:
            link_or_copy(kept, best)
    return None


def run_epochs(job: Any, out_dir: Path, *, resume: bool, stop_after: int | None, log: Logger) -> dict:
    """Train ``job`` (see ``wsi_scaat.training.trainer.TrainJob``) epoch by epoch, checkpointing each.

    Every process of a multi-process run calls this; rank 0 alone writes, the others wait for it.
    """
    main = job.dist.is_main
    out_dir.mkdir(parents=True, exist_ok=True)
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    tc = job.cfg.train
    start, best_score, best_epoch, history = 0, (-math.inf, -math.inf), -1, []
    if resume and last.is_file():
        state = load_checkpoint(last, job.rt.device)
        refusal = _resume_refusal(state, job, out_dir, restore=main)
        if refusal is None:
            job.net.load_state_dict(state["model"])
            job.optimizer.load_state_dict(state["optimizer"])
            job.scheduler.load_state_dict(state["scheduler"])
            job.scaler.load_state_dict(state["scaler"])
            start, history = int(state["epoch"]), list(state["history"])
            best_score, best_epoch = tuple(state["best_metric"]), int(state["best_epoch"])
            log(f"resuming from {last} after epoch {start}")
        else:
            log(f"{last} {refusal}: starting afresh")
    for epoch in range(start, tc.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        seed_everything(epoch_seed(tc.seed, epoch))
        job.set_epoch(epoch)
        t0 = time.perf_counter()
        row = {"epoch": epoch + 1}
        row.update(
            train_one_epoch(job.model, job.train_loader, job.method, job.optimizer, job.scheduler,
                            job.scaler, job.rt, epoch, job.show_progress)
        )  # fmt: skip
        row.update(evaluate(job.net, job.val_loader, job.rt))
        row["lr"] = job.optimizer.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        score = _score(row, tc.select_by)
        improved = score > best_score or best_epoch < 0
        if improved:
            best_score, best_epoch = score, epoch + 1
        if main:
            state = job.checkpoint_state(epoch + 1, best_score, best_epoch, history)
            if improved:
                save_checkpoint(best, state)
                link_or_copy(best, _kept_best(out_dir, best_epoch))
            write_metrics_csv(out_dir / "metrics.csv", history)
            write_curves(out_dir / "curves.png", history, title=f"{job.method.name} on {job.cfg.cohort.name}")
            save_checkpoint(last, state)  # last: the epoch is complete once last.pt says so
            for old in out_dir.glob("best-epoch*.pt"):
                if old != _kept_best(out_dir, best_epoch):
                    old.unlink(missing_ok=True)
        distributed.barrier(job.dist, job.rt.device)
        log(
            f"epoch {epoch + 1}/{tc.epochs}  train loss {row['train_loss']:.4f}"
            f" acc {row['train_accuracy']:.3f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} auroc {row['val_auroc']:.3f}"
            f" | {row['seconds']:.1f} s{'  *best' if improved else ''}"
        )
    return {"epochs": len(history), "best_epoch": best_epoch, "history": history, "version": __version__}
