"""Data-parallel training: ``torchrun`` on 2 CPU processes (DDP, gloo) against one process, same global batch.

The distributed runs go through the real entry point (``python -m torch.distributed.run ... -m
wsi_scaat train``). The configs make the two runs comparable value by value:

* ``model.dropout: 0``: dropout masks are drawn per process, so with dropout the runs agree only
  in distribution (every other random draw, SCAAT/SGT noise and augmentation, is per sample);
* SGD rather than AdamW: Adam's update is invariant to the gradient's scale, so it would hide a
  wrongly scaled (summed instead of averaged) gradient;
* ``amp: false`` (float32): under bfloat16 autocast the two runs' different summation orders are
  rounded to 8 mantissa bits, far beyond the tolerance below (bf16 CPU training is checked for
  determinism and exact resume in ``test_training.py``);
* ``scaat.steps: 0`` (the random start within the saliency-ranked budget, no PGD sign step) and
  ``scaat.bf16_search: false``: ``sign`` of an input-gradient element that is ~0 is decided by
  float rounding, and one flipped element moves that pixel by 2 eps; SCAAT then amplifies it
  (measured: one flip in the first step of epoch 2 gives weights 2e-3 apart four steps later,
  against 5e-7 without a flip). The PGD step itself runs through the same pieces (input gradients
  of the unwrapped model, global-batch BatchNorm) as the saliency pass checked here.

Tolerance. The two runs add the same float32 numbers in other orders (BatchNorm statistics over
the ranks, gradients averaged over two half batches), ~1e-7 relative per step, and nothing here
amplifies that: weights agree to ~2e-7 after 8 steps (measured); the test allows ``atol=1e-5`` and
records to ``rel=2e-5`` (``metrics.csv`` prints 6 digits). Sharding errors are far larger (measured):
BatchNorm statistics per process instead of over the global batch put the ERM weights 5e-2 apart,
SCAAT noise drawn per process instead of per global batch 1e-2.
"""

from __future__ import annotations

import copy
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from wsi_scaat.config import validate_config
from wsi_scaat.data import EpochSampler, PatchDataset, build_augment, cohort_stores, make_loader
from wsi_scaat.training.checkpoint import load_checkpoint
from wsi_scaat.training.distributed import DistInfo, convert_global_bn
from wsi_scaat.training.loop import TrainingError
from wsi_scaat.training.trainer import build_job, fit

ATOL = 1e-5  # max |weight difference| (float32 weights of magnitude ~0.1-1)
RTOL = 2e-5  # metrics.csv values (6 significant digits)


def _comparable(base: dict) -> dict:
    train = {**base["train"], "epochs": 2, "optimizer": "sgd", "lr": 0.05, "amp": False,
             "model": {**base["train"]["model"], "dropout": 0.0},
             "scaat": {"warmup_epochs": 1, "bf16_search": False, "steps": 0}}  # fmt: skip
    return {**base, "train": train}


def _torchrun(config: Path, method: str, out: Path, *args: str) -> str:
    """``wsi-scaat train`` on 2 processes; its output (rank 0 logs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "wsi_scaat", "train", "--config", str(config), "--method", method, "--out", str(out),
           "--no-progress", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSI_SCAAT_DEBUG": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _assert_same_run(single: Path, multi: Path) -> float:
    """Same epochs, weights within ATOL, same records within RTOL; the max weight difference."""
    a, b = (load_checkpoint(d / "last.pt") for d in (single, multi))
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    print(f"{multi.name}: max |weight difference| {diff:.3g} (atol {ATOL})")
    assert diff <= ATOL
    rows_a, rows_b = (list(csv.DictReader((d / "metrics.csv").open())) for d in (single, multi))
    assert [r.keys() for r in rows_a] == [r.keys() for r in rows_b] and len(rows_a) == 2
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ra.keys() - {"seconds"}:
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=RTOL, abs=1e-6), key
    assert not [p.name for p in multi.iterdir() if p.name.startswith(".")]  # no stray temporary files
    return diff


@pytest.mark.slow  # two torchrun launches of 2 processes: ~15 s each on 2 idle cores, more when busy
def test_erm_on_two_processes_equals_one(tiny_cohort: dict, tmp_path: Path) -> None:
    cfg = _comparable(tiny_cohort)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    fit(validate_config(cfg), "erm", tmp_path / "single", log=lambda _: None)
    log = _torchrun(config, "erm", tmp_path / "ddp")
    assert log.count("2 processes (gloo)") == 1 and log.count("erm: best epoch") == 1  # rank 0 alone
    _assert_same_run(tmp_path / "single", tmp_path / "ddp")


@pytest.mark.slow
def test_scaat_resumed_on_two_processes_equals_one(tiny_cohort: dict, tmp_path: Path) -> None:
    """Epoch 1 in one process, epoch 2 (mask ratio at full strength) resumed on two, against both in one."""
    cfg = _comparable(tiny_cohort)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    single, multi = tmp_path / "single", tmp_path / "ddp"
    fit(validate_config(cfg), "scaat", single, stop_after=1, log=lambda _: None)
    shutil.copytree(single, multi)
    fit(validate_config(cfg), "scaat", single, resume=True, log=lambda _: None)
    log = _torchrun(config, "scaat", multi, "--resume")
    assert "after epoch 1" in log
    _assert_same_run(single, multi)


# --- pieces, in one process ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shuffle", "balanced"])
def test_rank_shards_make_up_the_global_batches(mode: str) -> None:
    labels = np.arange(37) % 3
    kw = {"seed": 5, "labels": labels, "keyed": True, "batch_size": 8}
    single = list(EpochSampler(37, mode, **kw))
    shards = [list(EpochSampler(37, mode, rank=r, world_size=4, **kw)) for r in range(4)]
    assert all(len(s) == 8 for s in shards)  # 4 full batches of 8, 2 items per rank
    steps = [sum((s[2 * i : 2 * i + 2] for s in shards), []) for i in range(4)]
    assert steps == [single[8 * i : 8 * i + 8] for i in range(4)]  # (index, sample seed) pairs alike


def test_sharded_loaders_give_the_same_augmented_batches(tiny_cohort: dict) -> None:
    cfg = validate_config(tiny_cohort)
    stores = cohort_stores(cfg.cohort.manifest, cfg.results / "tiles", splits=("train",))["train"]

    def loader(rank: int, world: int, workers: int = 0) -> list:
        aug = build_augment(cfg.train.augment.model_copy(update={"color_jitter": 0.3}), train=True, seed=0)
        ds = PatchDataset.from_pairs(stores, transform=aug)
        return list(make_loader(ds, 8, train=True, balance=True, seed=2, rank=rank, world_size=world,
                                num_workers=workers))  # fmt: skip

    single, ranks = loader(0, 1), [loader(0, 2), loader(1, 2, workers=1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) > 1
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), y)


def test_sharded_evaluation_blocks_cover_the_split_in_order() -> None:
    ds = TensorDataset(torch.arange(23.0), torch.arange(23))
    single = [y.tolist() for _, y in make_loader(ds, 4, train=False)]
    blocks = [list(make_loader(ds, 4, train=False, rank=r, world_size=3)) for r in range(3)]
    assert [y.tolist() for block in blocks for _, y in block] == single  # whole batches, in rank order


def test_global_batch_must_split_evenly(tiny_cohort: dict) -> None:
    with pytest.raises(ValueError, match=r"global batch size \(10\) must be a multiple .* \(4\)"):
        make_loader(TensorDataset(torch.zeros(40)), 10, train=True, world_size=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_loader(TensorDataset(torch.zeros(6)), 8, train=True, world_size=2)
    cfg = validate_config({**tiny_cohort, "train": {**tiny_cohort["train"], "batch_size": 15}})
    with pytest.raises(TrainingError, match="train.batch_size: .*multiple"):
        build_job(cfg, "erm", dist=DistInfo(rank=0, world_size=2))


def test_global_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    reference = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    converted = convert_global_bn(model)
    assert type(converted[1]).__name__ == "GlobalBatchNorm"
    assert [id(p) for p in converted.parameters()] == params  # the optimiser's parameters stay valid
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.state_dict(), reference.state_dict())  # running stats updated alike
