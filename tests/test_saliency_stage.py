"""The patch saliency stage: one map per patch, probabilities, contracts with model and store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wsi_scaat.saliency.stage import SaliencyError, explain_batch, load_model, run_saliency
from wsi_scaat.saliency.store import open_saliency_store
from wsi_scaat.store import open_store


@pytest.fixture(scope="module")
def store_path(tiny_cohort: dict) -> Path:
    return Path(tiny_cohort["results_dir"]) / "tiny" / "tiles" / "synth_000.h5"


def test_stage_writes_the_contract(tiny_checkpoint: Path, store_path: Path, tmp_path: Path) -> None:
    out = run_saliency(tiny_checkpoint, store_path, tmp_path, batch_size=7, amp=False, progress=False)
    assert out == tmp_path / "synth_000.saliency.zarr"
    sal = open_saliency_store(out)
    with open_store(store_path) as patches:
        n = len(patches)
        np.testing.assert_array_equal(sal.coords, patches.coords)
        for key in ("slide_id", "patch_size_level0", "mpp_level0", "slide_width", "tissue_downsample"):
            assert sal.attrs[key] == patches.attrs[key]
        first = torch.from_numpy(np.asarray(patches.imgs[:3])).permute(0, 3, 1, 2).float() / 255
    assert sal.maps.shape == (n, 32, 32) and sal.maps.dtype == np.float16
    probs = sal.array("probs")
    assert probs.shape == (n, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(sal.array("target"), probs.argmax(1))
    assert sal.attrs["class_names"] == ["normal", "lesion"] and sal.attrs["map_size"] == 32
    assert sal.attrs["saliency_precision"] == {"autocast": "float32", "channels_last": False}
    assert sal.array("tissue_mask").ndim == 2
    # the stored maps are |d f_t / dx| summed over channels, computed by hand here
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    x = first.clone().requires_grad_(True)
    logits = model(x)
    t = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    np.testing.assert_allclose(
        sal.maps[:3].astype(np.float32), grad.abs().sum(1).numpy(), rtol=2e-3, atol=1e-6
    )
    np.testing.assert_allclose(sal.signed[:3].astype(np.float32), grad.sum(1).numpy(), rtol=2e-3, atol=1e-6)
    assert sal.attrs["saliency_version"] == 2 and sal.attrs["n_overlap"] == 0 and "overlap" not in sal.root


def test_overlap_patches_are_explained(tiny_checkpoint: Path, store_path: Path, tmp_path: Path) -> None:
    from wsi_scaat.saliency.overlap import plan_overlap

    sal = open_saliency_store(run_saliency(tiny_checkpoint, store_path, tmp_path, overlap=16, progress=False))
    with open_store(store_path) as patches:
        plan = plan_overlap(patches.coords, patches.attrs, 16)
        n = len(patches)
    extra = sal.root["overlap"]
    assert len(plan) > n and sal.attrs["n_overlap"] == len(plan) and sal.attrs["saliency_overlap"] == 16
    np.testing.assert_array_equal(extra["coords"][...], plan.coords)
    probs = extra["probs"][...]
    assert extra["maps"].shape == (len(plan), 32, 32) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(extra["target"][...], probs.argmax(1))
    with pytest.raises(SaliencyError, match="does not divide the tiling step of 32 px"):
        run_saliency(tiny_checkpoint, store_path, tmp_path / "bad", overlap=20, progress=False)


def test_downsample_and_fixed_target(tiny_checkpoint: Path, store_path: Path, tmp_path: Path) -> None:
    full = open_saliency_store(run_saliency(tiny_checkpoint, store_path, tmp_path / "a", target="lesion",
                                            progress=False))  # fmt: skip
    small = open_saliency_store(run_saliency(tiny_checkpoint, store_path, tmp_path / "b", target="lesion",
                                             map_downsample=4, progress=False))  # fmt: skip
    assert (full.array("target") == 1).all() and small.maps.shape[1:] == (8, 8)
    pooled = full.maps[:5].astype(np.float32).reshape(5, 8, 4, 8, 4).mean((2, 4))
    np.testing.assert_allclose(small.maps[:5].astype(np.float32), pooled, rtol=5e-3, atol=1e-6)


def test_mismatches_are_clear_errors(tiny_checkpoint: Path, store_path: Path, tmp_path: Path) -> None:
    with pytest.raises(SaliencyError, match="neither 'predicted' nor one of the classes"):
        run_saliency(tiny_checkpoint, store_path, tmp_path, target="tumour", progress=False)
    with pytest.raises(SaliencyError, match="does not divide"):
        run_saliency(tiny_checkpoint, store_path, tmp_path, map_downsample=5, progress=False)
    from wsi_scaat.slides.tiling import TileParams, tile_slide

    other = tile_slide(open_store(store_path).attrs["source_path"], tmp_path / "t64",
                       TileParams(patch_size=64, target_mpp=2.0), progress=False)  # fmt: skip
    with pytest.raises(SaliencyError, match="trained on 32 px patches"):
        run_saliency(tiny_checkpoint, other, tmp_path, progress=False)
    assert not list(tmp_path.glob("*.saliency.zarr"))


@pytest.mark.parametrize("method", ["gradient", "grad_x_input"])
def test_fused_path_equals_attribution_api(tiny_checkpoint: Path, method: str) -> None:
    from wsi_scaat.saliency import attribute

    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probs, target, maps, signed = explain_batch(model, x, None, method, {})
    expected = attribute(model, x, target, method)
    torch.testing.assert_close(maps, expected.abs().sum(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(signed, expected.sum(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs, torch.softmax(model(x), 1), rtol=1e-5, atol=1e-7)


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per map (midranks) of two (N, h, w) map stacks."""
    from scipy.stats import rankdata

    ra, rb = (rankdata(m.reshape(len(m), -1).astype(np.float64), axis=1) for m in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))


def test_bf16_maps_are_close_to_fp32_maps(tiny_checkpoint: Path, store_path: Path, tmp_path: Path) -> None:
    """``amp: true`` (forced, so also on CPUs without native bf16): float16 maps, float32 probabilities,
    each map ranked as its float32 map (Spearman) and as sparse (Gini); the precision recorded."""
    from wsi_scaat.metrics import sparseness_gini

    def stage(name: str, amp: bool) -> Any:
        out = run_saliency(
            tiny_checkpoint, store_path, tmp_path / name, target="lesion", amp=amp, progress=False
        )
        return open_saliency_store(out)

    fp32, bf16 = stage("fp32", False), stage("bf16", True)
    assert bf16.attrs["saliency_precision"] == {"autocast": "bfloat16", "channels_last": True}
    assert bf16.maps.dtype == np.float16 and bf16.array("probs").dtype == np.float32
    np.testing.assert_allclose(bf16.array("probs"), fp32.array("probs"), atol=0.02)
    a, b = fp32.maps[:].astype(np.float32), bf16.maps[:].astype(np.float32)
    rho = _spearman(a, b)
    gini = (sparseness_gini(b) - sparseness_gini(a)).abs()
    print(
        f"bf16 vs fp32: Spearman mean {rho.mean():.4f} min {rho.min():.4f}; Gini |diff| max {gini.max():.5f}"
    )
    assert rho.mean() > 0.95 and rho.min() > 0.9
    assert float(gini.max()) < 0.01


def test_amp_auto_keeps_mask_optimisation_in_float32(tiny_checkpoint: Path, store_path: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from wsi_scaat.training import loop

    monkeypatch.setattr(loop, "fast_bf16", lambda device: True)  # as on a CPU with native bf16
    auto = {}
    for method in ("gradient", "mask_opt"):
        out = run_saliency(tiny_checkpoint, store_path, tmp_path / method, method=method, amp="auto",
                           options={"n_iter": 1} if method == "mask_opt" else {}, progress=False)  # fmt: skip
        auto[method] = open_saliency_store(out).attrs["saliency_precision"]["autocast"]
    assert auto == {"gradient": "bfloat16", "mask_opt": "float32"}


def test_cli_amp_reaches_the_stage(tiny_checkpoint: Path, store_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_scaat.cli import app

    args = ["saliency", "--checkpoint", str(tiny_checkpoint), "--store", str(store_path), "--no-progress"]
    for value, dtype in (("false", "float32"), ("true", "bfloat16")):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / value), "--amp", value])
        assert result.exit_code == 0, result.output
        attrs = open_saliency_store(tmp_path / value / "synth_000.saliency.zarr").attrs
        assert attrs["saliency_precision"]["autocast"] == dtype
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--amp", "maybe"])
    assert bad.exit_code != 0 and "maybe" in bad.output
