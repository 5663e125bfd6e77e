"""Assemble a training job from the config: data, model, method, optimiser; then ``fit`` it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_scaat import __version__
from wsi_scaat.config import Config
from wsi_scaat.training.checkpoint import config_hash
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

    @property
    def train_hash(self) -> str:
        """What must be unchanged for ``--resume`` to continue a run."""
        return config_hash(
            {"method": self.method_name, "train": self.cfg.train.model_dump(mode="json"),
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
            "model": self.model.state_dict(),
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
            "class_names": list(self.cfg.train.class_names),
            "normalization": {"mean": list(mc.mean), "std": list(mc.std)},
            "wsi_scaat_version": __version__,
            **self.meta,
        }


def build_job(cfg: Config, method_name: str, show_progress: bool | None = None) -> TrainJob:
    """Datasets split by slide, model, method and optimiser for ``method_name``."""
    from wsi_scaat.data import PatchDataset, build_augment, cohort_stores, make_loader
    from wsi_scaat.models import build_model
    from wsi_scaat.training.methods import build_method

    tc = cfg.train
    device = resolve_device(tc.device)
    if device.type == "cpu" and tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    splits = cohort_stores(cfg.cohort.manifest, cfg.results / "tiles", cfg.tiling.format, ("train", "val"))
    if not splits.get("train"):
        raise TrainingError(cfg.cohort.manifest, "no slide of split 'train' in the manifest")

    def dataset(split: str, train: bool) -> Any:
        entries = splits.get(split, [])
        return PatchDataset(
            [p for p, _ in entries], label_source=tc.label_source, slide_labels=[lab for _, lab in entries],
            transform=build_augment(tc.augment, train=train, seed=tc.seed),
        )  # fmt: skip

    train_ds, val_ds = dataset("train", True), dataset("val", False)
    n_classes = len(tc.class_names)
    if len(train_ds.labels) and int(train_ds.labels.max()) >= n_classes:
        raise TrainingError(None, f"labels go up to {int(train_ds.labels.max())} but train.class_names "
                                  f"has {n_classes} names")  # fmt: skip
    train_loader = make_loader(train_ds, tc.batch_size, train=True, balance=tc.balance_classes, seed=tc.seed,
                               num_workers=tc.num_workers)  # fmt: skip
    val_loader = make_loader(val_ds, tc.batch_size, train=False, num_workers=tc.num_workers)
    seed_everything(tc.seed)
    model = build_model(tc.model, n_classes).to(device)
    rt = make_runtime(device, tc.amp, tc.channels_last)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tc)
    steps = max(1, len(train_loader))
    scheduler = build_scheduler(optimizer, tc.epochs * steps, int(tc.lr_warmup_epochs * steps))
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp_dtype == torch.float16)
    with_attrs = train_ds.store_attrs if hasattr(train_ds, "store_attrs") else {}
    meta = {"patch_size": int(train_ds.patch_size),
            "patch_mpp": float(with_attrs.get("patch_mpp", cfg.tiling.target_mpp)),
            "n_train": len(train_ds), "n_val": len(val_ds)}  # fmt: skip
    return TrainJob(cfg, method_name, model, build_method(method_name, tc), train_loader, val_loader,
                    optimizer, scheduler, scaler, rt, meta, show_progress)  # fmt: skip


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
    """
    job = build_job(cfg, method_name, show_progress)
    log(f"training {method_name} on {job.rt.device} ({job.meta['n_train']} train / {job.meta['n_val']} val "
        f"patches, {cfg.train.model.name}, {cfg.train.epochs} epochs)")  # fmt: skip
    return run_epochs(job, Path(out_dir), resume=resume, stop_after=stop_after, log=log)
