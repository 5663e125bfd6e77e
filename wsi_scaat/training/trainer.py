"""Assemble a training job from the config: data, model, method, optimiser; then ``fit`` it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_scaat import __version__
from wsi_scaat.config import Config
from wsi_scaat.training import distributed
from wsi_scaat.training.checkpoint import config_hash
from wsi_scaat.training.distributed import DistInfo
from wsi_scaat.training.loop import (
    Logger,
    Runtime,
    TrainingError,
    build_optimizer,
    build_scheduler,
    make_runtime,
    resolve_device,
    run_epochs,
    seed_everything,
)
from wsi_scaat.training.methods.base import fast_bf16


@dataclass
class TrainJob:
    """Everything one training run needs; built by :func:`build_job`."""

    cfg: Config
    method_name: str
    model: nn.Module
    method: Any
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    rt: Runtime
    meta: dict[str, Any] = field(default_factory=dict)
    show_progress: bool | None = None
    dist: DistInfo = DistInfo()

    @property
    def net(self) -> nn.Module:
        """The model itself (``model`` may be wrapped in DistributedDataParallel)."""
        return distributed.unwrap(self.model)

    @property
    def train_hash(self) -> str:
        """What must be unchanged for ``--resume`` to continue a run (not the number of processes)."""
        not_results = frozenset({"gpus", "dist_backend", "max_open_stores"})
        train = self.cfg.train.identity(self.method_name, not_results)
        return config_hash(
            {"method": self.method_name, "train": train,
             "tiling": self.cfg.tiling.model_dump(mode="json"), "manifest": str(self.cfg.cohort.manifest)}
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Make the epoch's sample order and augmentations a function of (seed, epoch) only."""
        for loader in (self.train_loader, self.val_loader):
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            dataset = getattr(loader, "dataset", None)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def checkpoint_state(self, epoch: int, best_metric: tuple, best_epoch: int, history: list) -> dict:
        """The self-describing checkpoint dict after ``epoch`` epochs."""
        mc = self.cfg.train.model
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_metric": list(best_metric),
            "best_epoch": best_epoch,
            "history": history,
            "method": self.method_name,
            "config": self.cfg.model_dump(mode="json"),
            "model_config": mc.model_dump(mode="json"),
            "train_hash": self.train_hash,
            "precision": self.rt.precision,
            "class_names": list(self.cfg.train.class_names),
            "normalization": {"mean": list(mc.mean), "std": list(mc.std)},
            "wsi_scaat_version": __version__,
            **self.meta,
        }


def build_job(
    cfg: Config, method_name: str, show_progress: bool | None = None, dist: DistInfo | None = None
) -> TrainJob:
    """Datasets split by slide, model, method and optimiser for ``method_name``.

    With ``dist`` of several processes (an initialised process group), this rank's shard of every
    global batch, the model on its device wrapped in DistributedDataParallel (see
    :mod:`wsi_scaat.training.distributed`).
    """
    from wsi_scaat.data import PatchDataset, build_augment, cohort_stores, make_loader
    from wsi_scaat.models import build_model
    from wsi_scaat.training.methods import build_method

    tc = cfg.train
    dist = dist or DistInfo()
    method = build_method(method_name, tc)
    if dist.enabled and not method.supports_ddp:
        raise TrainingError(None, f"method {method_name!r} cannot run under DistributedDataParallel")
    device = distributed.device_for(dist, resolve_device(tc.device))
    if device.type == "cpu" and tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    splits = cohort_stores(cfg.cohort.manifest, cfg.results / "tiles", cfg.tiling.format, ("train", "val"))
    if not splits.get("train"):
        raise TrainingError(cfg.cohort.manifest, "no slide of split 'train' in the manifest")

    def dataset(split: str, train: bool) -> Any:
        entries = splits.get(split, [])
        return PatchDataset(
            [p for p, _ in entries], label_source=tc.label_source, slide_labels=[lab for _, lab in entries],
            transform=build_augment(tc.augment, train=train, seed=tc.seed), max_open=tc.max_open_stores,
            ignore_band=tc.ignore_band if train else None,
        )  # fmt: skip

    train_ds, val_ds = dataset("train", True), dataset("val", False)
    n_classes = len(tc.class_names)
    if len(train_ds.labels) and int(train_ds.labels.max()) >= n_classes:
        raise TrainingError(None, f"labels go up to {int(train_ds.labels.max())} but train.class_names "
                                  f"has {n_classes} names")  # fmt: skip
    shard = {"rank": dist.rank, "world_size": dist.world_size, "num_workers": tc.num_workers}
    try:
        train_loader = make_loader(train_ds, tc.batch_size, train=True, balance=tc.balance_classes,
                                   seed=tc.seed, **shard)  # fmt: skip
        val_loader = make_loader(val_ds, tc.batch_size, train=False, **shard)
    except ValueError as exc:
        raise TrainingError(None, f"train.batch_size: {exc}") from None
    seed_everything(tc.seed)
    model = build_model(tc.model, n_classes).to(device)
    rt = make_runtime(device, tc.amp, tc.channels_last)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = distributed.wrap_model(model, dist, device)
    optimizer = build_optimizer(model, tc)
    steps = max(1, len(train_loader))
    scheduler = build_scheduler(optimizer, tc.epochs * steps, int(tc.lr_warmup_epochs * steps))
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp_dtype == torch.float16)
    with_attrs = train_ds.store_attrs if hasattr(train_ds, "store_attrs") else {}
    meta = {"patch_size": int(train_ds.patch_size),
            "patch_mpp": float(with_attrs.get("patch_mpp", cfg.tiling.target_mpp)),
            "n_train": len(train_ds), "n_val": len(val_ds)}  # fmt: skip
    if tc.ignore_band is not None:
        meta["n_ignored"] = int(train_ds.n_ignored)
    return TrainJob(cfg, method_name, model, method, train_loader, val_loader, optimizer, scheduler,
                    scaler, rt, meta, show_progress, dist)  # fmt: skip


def fit(
    cfg: Config,
    method_name: str,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    log: Logger = print,
    show_progress: bool | None = None,
) -> dict:
    """Train one model with ``method_name``; checkpoints and records go to ``out_dir``.

    ``stop_after`` ends the run after that many epochs in total (as a time-boxed job would);
    ``resume`` continues from ``out_dir/last.pt`` when it was made with the same settings.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: it joins the process group
    (and leaves it at the end), trains its shard of each global batch, and rank 0 alone logs and
    writes. The summary (the same on every rank) has ``rank``.
    """
    dist = distributed.env_info()
    if dist.enabled:
        device = distributed.device_for(dist, resolve_device(cfg.train.device))
        dist = distributed.init_process_group(dist, device, cfg.train.dist_backend)
    try:
        if not dist.is_main:
            log, show_progress = _silent, False
        job = build_job(cfg, method_name, show_progress, dist)
        procs = f", {dist.world_size} processes ({dist.backend or 'DDP'})" if dist.enabled else ""
        ignored = f", {job.meta['n_ignored']} mixed left out" if "n_ignored" in job.meta else ""
        log(f"training {method_name} on {job.rt.device}{procs} ({job.meta['n_train']} train{ignored} / "
            f"{job.meta['n_val']} val patches, {cfg.train.model.name}, {cfg.train.epochs} epochs, "
            f"batch {cfg.train.batch_size}, {_describe(job.rt)})")  # fmt: skip
        if job.rt.amp_dtype is not None and job.rt.device.type == "cpu" and not fast_bf16(job.rt.device):
            log("warning: train.amp is true but this CPU has no native bfloat16 (AVX512-BF16, AMX): bf16 is "
                "emulated and likely slower than float32; train.amp: auto picks float32 here")  # fmt: skip
        summary = run_epochs(job, Path(out_dir), resume=resume, stop_after=stop_after, log=log)
        return {**summary, "rank": dist.rank}
    finally:
        distributed.shutdown(dist)


def _describe(rt: Runtime) -> str:
    """The runtime's arithmetic in words, e.g. ``bfloat16 autocast, channels-last``."""
    dtype = rt.precision["autocast"]
    return (f"{dtype} autocast" if rt.amp_dtype is not None else dtype) + (
        ", channels-last" if rt.channels_last else ""
    )


def _silent(_: str) -> None:
    """The log of ranks other than 0."""
