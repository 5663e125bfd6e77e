"""The training loop: checkpoints, exact resume, records, clear errors, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from wsi_scaat.config import validate_config
from wsi_scaat.training.checkpoint import load_checkpoint
from wsi_scaat.training.loop import TrainingError
from wsi_scaat.training.trainer import fit


def _cfg(base: dict, **train: object):
    return validate_config({**base, "train": {**base["train"], **train}})


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["erm", "scaat"])
def test_resume_equals_uninterrupted(tiny_cohort: dict, tmp_path: Path, method: str, amp: bool) -> None:
    """Bitwise, in float32 and under bfloat16 autocast + channels-last (forced: also on CPUs without bf16)."""
    cfg = _cfg(tiny_cohort, amp=amp, channels_last=amp)
    fit(cfg, method, tmp_path / "full", log=_quiet)
    fit(cfg, method, tmp_path / "cut", stop_after=1, log=_quiet)  # "killed" after epoch 1
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    fit(cfg, method, tmp_path / "cut", resume=True, log=_quiet)
    full, cut = (load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "cut"))
    assert full["epoch"] == cut["epoch"] == 3
    assert full["precision"] == cut["precision"] == {"autocast": "bfloat16" if amp else "float32",
                                                     "channels_last": amp}  # fmt: skip
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in cut["history"]]


def test_bf16_training_is_deterministic_and_differs_from_fp32(tiny_cohort: dict, tmp_path: Path) -> None:
    """Same seed, same bf16 weights bitwise; and bf16 really is another computation than float32."""
    runs = {}
    for name, amp in (("a", True), ("b", True), ("fp32", False)):
        fit(_cfg(tiny_cohort, epochs=1, amp=amp, channels_last=amp), "erm", tmp_path / name, log=_quiet)
        runs[name] = load_checkpoint(tmp_path / name / "last.pt")["model"]
    assert all(torch.equal(v, runs["b"][k]) for k, v in runs["a"].items())
    assert not all(torch.equal(v, runs["fp32"][k]) for k, v in runs["a"].items())
    assert all(v.dtype == runs["fp32"][k].dtype for k, v in runs["a"].items())  # weights stay float32


def test_resume_in_another_precision_starts_afresh(tiny_cohort: dict, tmp_path: Path, monkeypatch) -> None:
    """``amp: auto`` resolves per machine: a run continued where it resolves otherwise starts afresh."""
    from wsi_scaat.training import loop, trainer

    cfg = _cfg(tiny_cohort, epochs=2, amp="auto", channels_last=False)
    for module in (loop, trainer):
        monkeypatch.setattr(module, "fast_bf16", lambda device: False)  # a CPU without bf16: float32
    first: list[str] = []
    fit(cfg, "erm", tmp_path, stop_after=1, log=first.append)
    assert load_checkpoint(tmp_path / "last.pt")["precision"]["autocast"] == "float32"
    assert "batch 16, float32)" in first[0] and not any("warning" in line for line in first)
    monkeypatch.setattr(loop, "fast_bf16", lambda device: True)  # resumed on a CPU with bf16
    lines: list[str] = []
    fit(cfg, "erm", tmp_path, resume=True, log=lines.append)
    assert any("trained in another precision" in line and "starting afresh" in line for line in lines), lines
    assert load_checkpoint(tmp_path / "last.pt")["precision"]["autocast"] == "bfloat16"
    assert "batch 16, bfloat16 autocast)" in lines[0]
    forced: list[str] = []  # amp: true on a CPU without native bf16 is honoured, with a warning
    fit(_cfg(tiny_cohort, epochs=1, amp=True), "erm", tmp_path / "forced", log=forced.append)
    assert "bfloat16 autocast, channels-last" in forced[0] and "emulated" in forced[1]


def test_runtime_resolution(monkeypatch) -> None:
    """What ``amp`` and ``channels_last`` resolve to, per device and bf16 support."""
    from wsi_scaat.training import loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(loop, "fast_bf16", lambda device, native=native: native)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda native=native: native)
        half = torch.bfloat16 if native else torch.float16
        assert loop.amp_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
        assert loop.amp_dtype(cpu, True) == torch.bfloat16 and loop.amp_dtype(cpu, False) is None
        assert loop.amp_dtype(cuda, "auto") == loop.amp_dtype(cuda, True) == half
        assert loop.amp_dtype(cuda, "auto", fp16=False) == (torch.bfloat16 if native else None)
        assert loop.amp_dtype(cuda, False) is None
    assert loop.use_channels_last(cuda, "auto") and not loop.use_channels_last(cpu, False)
    assert loop.use_channels_last(cpu, "auto") == torch.backends.mkldnn.is_available()
    rt = loop.make_runtime(cpu, False, True)
    assert rt.precision == {"autocast": "float32", "channels_last": True}
    assert rt.to_device(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)


def test_checkpoint_contents_and_records(tiny_cohort: dict, tmp_path: Path) -> None:
    cfg = _cfg(tiny_cohort, epochs=2)
    summary = fit(cfg, "erm", tmp_path, log=_quiet)
    state = torch.load(tmp_path / "best.pt", weights_only=True)  # loads without unpickling code
    for key in ("model", "optimizer", "config", "class_names", "normalization", "epoch", "patch_size",
                "patch_mpp", "method", "history", "precision"):  # fmt: skip
        assert key in state, key
    assert state["class_names"] == ["normal", "lesion"] and state["patch_size"] == 32
    assert state["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert state["config"]["train"]["epochs"] == 2 and state["method"] == "erm"
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auroc", "lr"} <= set(rows[0])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert summary["epochs"] == 2 and not list(tmp_path.glob(".*tmp*"))


def test_resume_with_other_settings_starts_afresh(tiny_cohort: dict, tmp_path: Path) -> None:
    fit(_cfg(tiny_cohort, epochs=1), "erm", tmp_path, log=_quiet)
    lines: list[str] = []
    fit(_cfg(tiny_cohort, epochs=1, lr=0.001), "erm", tmp_path, resume=True, log=lines.append)
    assert any("starting afresh" in line for line in lines)


def test_non_finite_loss_names_epoch_and_step(tiny_cohort: dict, tmp_path: Path, monkeypatch) -> None:
    from wsi_scaat.training.methods import erm

    original = erm.ErmMethod.step
    calls = {"n": 0}

    def poisoned(self, model, x, y, progress):
        out = original(self, model, x, y, progress)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(erm.ErmMethod, "step", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 1, step 3"):
        fit(_cfg(tiny_cohort, epochs=1), "erm", tmp_path, log=_quiet)


def test_train_cli(tiny_cohort: dict, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from wsi_scaat.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_cohort))
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--method", "sgt", "--out", str(out),
                                      "--epochs", "1", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sgt: best epoch 1" in result.output and (out / "best.pt").is_file()
    bad = CliRunner().invoke(app, ["train", "--config", str(config), "--method", "erm", "--device", "cuda"])
    if not torch.cuda.is_available():
        assert bad.exit_code == 1 and "no CUDA device" in bad.output


def test_best_epoch_selection_breaks_ties_by_loss() -> None:
    from wsi_scaat.training.loop import _score

    rows = [
        {"val_auroc": 1.0, "val_loss": 0.20, "val_accuracy": 0.9},
        {"val_auroc": 1.0, "val_loss": 0.05, "val_accuracy": 0.9},
        {"val_auroc": 0.9, "val_loss": 0.01, "val_accuracy": 0.9},
        {"val_auroc": float("nan"), "val_loss": 0.01, "val_accuracy": 0.95},
    ]
    ranked = sorted(range(4), key=lambda i: _score(rows[i], "val_auroc"), reverse=True)
    assert ranked == [1, 0, 3, 2]  # NaN AUROC falls back to accuracy 0.95 < 1.0 but > 0.9
    assert max(range(3), key=lambda i: _score(rows[i], "val_loss")) == 2
    epochs = [{**r, "epoch": k + 1} for k, r in enumerate(rows)]
    assert max(range(4), key=lambda i: _score(epochs[i], "last")) == 3  # the last epoch, whatever its metrics


def test_training_needs_only_train_and_val_stores(tiny_cohort: dict, tmp_path: Path) -> None:
    """Test slides may still be tiling while a model trains (Snakemake schedules it so)."""
    import shutil

    from wsi_scaat.manifest import read_manifest

    results = tmp_path / "results"
    shutil.copytree(Path(tiny_cohort["results_dir"]), results)
    test_ids = [e.slide_id for e in read_manifest(tiny_cohort["cohort"]["manifest"]) if e.split == "test"]
    assert test_ids
    for sid in test_ids:
        (results / "tiny" / "tiles" / f"{sid}.h5").unlink()
    cfg = validate_config({**tiny_cohort, "results_dir": str(results),
                           "train": {**tiny_cohort["train"], "epochs": 1}})  # fmt: skip
    assert fit(cfg, "erm", tmp_path / "m", log=_quiet)["epochs"] == 1


def test_ignore_band_applies_to_training_only(tiny_cohort: dict) -> None:
    """train.ignore_band thins the training patches; validation keeps every patch."""
    from wsi_scaat.training.trainer import build_job

    plain = build_job(_cfg(tiny_cohort), "erm")
    band = build_job(_cfg(tiny_cohort, ignore_band=[0.05, 0.95]), "erm")
    total = band.train_loader.dataset.n_ignored + len(band.train_loader.dataset)
    assert total == len(plain.train_loader.dataset) and band.meta["n_ignored"] > 0
    assert len(band.val_loader.dataset) == len(plain.val_loader.dataset) == plain.meta["n_val"]
    assert "n_ignored" not in plain.meta
