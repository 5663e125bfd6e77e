"""The patch saliency stage: one map per patch, probabilities, contracts with model and store."""

from __future__ import annotations

from pathlib import Path

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
    out = run_saliency(tiny_checkpoint, store_path, tmp_path, batch_size=7, progress=False)
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
