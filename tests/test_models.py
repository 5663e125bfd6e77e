"""Model registry and builder: shapes, normalisation inside the model, local weights only, saliency."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from wsi_scaat.models import (
    MODELS,
    ModelConfig,
    ModelWeightsError,
    SmallCNN,
    build_model,
    count_parameters,
    register,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download weights (or open a socket) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_build_and_map_shapes(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8), num_classes=3).eval()
    with torch.no_grad():
        for size in (48, 64):
            assert model(torch.rand(2, 3, size, size)).shape == (2, 3)
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3)
    assert count_parameters(model) > 0


def test_small_cnn_any_size_and_trains():
    model = build_model(ModelConfig(width=8), 2)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert build_model(ModelConfig(width=8), 2).eval()(torch.rand(1, 3, 101, 77)).shape == (1, 2)


def test_normalisation_is_inside():
    cfg = ModelConfig(width=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    model = build_model(cfg, 2).eval()
    x = torch.rand(2, 3, 48, 48)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone((x - mean) / std))
    assert all(k.startswith("backbone.") for k in model.state_dict())  # constants are config, not weights


def test_input_saliency_flows():
    model = build_model(ModelConfig(width=8), 2).eval()
    x = torch.rand(1, 3, 48, 48, requires_grad=True)
    model(x)[0, 1].backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.9


@pytest.mark.parametrize("wrap", ["state_dict", "checkpoint", "backbone_only"])
def test_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    src = build_model(ModelConfig(width=8), 2).eval()
    state = src.state_dict()
    obj = {
        "state_dict": state,
        "checkpoint": {"model": state, "epoch": 3},
        "backbone_only": src.backbone.state_dict(),
    }[wrap]
    torch.save(obj, tmp_path / "w.pt")
    torch.manual_seed(2)
    loaded = build_model(ModelConfig(width=8, weights=tmp_path / "w.pt"), 2).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def test_bad_weights_name_the_file(tmp_path):
    def build(path: Path, **kw):
        return build_model(ModelConfig(width=8, weights=path, **kw), 2)

    with pytest.raises(ModelWeightsError, match="nope.pt.*not found"):
        build(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelWeightsError, match="junk.pt.*cannot read"):
        build(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelWeightsError, match="list.pt.*not a state_dict"):
        build(tmp_path / "list.pt")
    torch.save(build_model(ModelConfig(width=16), 2).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ModelWeightsError, match=r"wide.pt.*does not fit SmallCNN.*shape mismatch"):
        build(tmp_path / "wide.pt")
    torch.save(build_model(ModelConfig(width=8), 5).state_dict(), tmp_path / "classes.pt")
    with pytest.raises(ModelWeightsError, match=r"classes.pt.*head\.3\.weight \(5, 32\) vs \(2, 32\)"):
        build(tmp_path / "classes.pt")
    torch.save({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "keys.pt")
    with pytest.raises(ModelWeightsError, match="keys.pt.*missing keys.*unexpected keys"):
        build(tmp_path / "keys.pt")


def test_config_and_registry_validation():
    with pytest.raises(ValidationError):
        ModelConfig(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValidationError):
        ModelConfig(name="vit")
    with pytest.raises(ValidationError):
        ModelConfig(depth=3)
    with pytest.raises(ValueError, match="already registered"):
        register("small_cnn")(lambda cfg, n: SmallCNN(n))
    with pytest.raises(ValueError, match="num_classes"):
        build_model(ModelConfig(), 0)


def test_count_parameters():
    model = build_model(ModelConfig(width=8), 2)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.backbone.parameters())
    for p in model.backbone.features.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 32 * 2 + 2  # the linear head alone


def test_antialiased_downsampling_removes_the_gradient_grid() -> None:
    """Stride-2 convolutions put grid-frequency energy into input gradients; blur-then-stride and average
    pooling do not (same seed, same inputs, untrained models)."""
    from wsi_scaat.metrics.aliasing import nyquist_energy, parity_balance
    from wsi_scaat.models.small_cnn import SmallCNN

    x = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    figures = {}
    for downsample in ("stride", "blur", "avgpool"):
        torch.manual_seed(1)
        model = SmallCNN(2, 8, downsample=downsample).eval()
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
        maps = grad.abs().sum(1)
        figures[downsample] = (nyquist_energy(maps).mean().item(), parity_balance(maps).mean().item())
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 2)  # the smallest input still works
    for smooth in ("blur", "avgpool"):
        assert figures[smooth][0] < 0.5 * figures["stride"][0], figures
        assert figures[smooth][1] > 0.9, figures


def test_blur_kernel_is_part_of_the_checkpoint() -> None:
    """A blur model's state_dict holds the kernels, so it cannot silently load into a strided model."""
    from wsi_scaat.models import ModelConfig, build_model

    blur = build_model(ModelConfig(downsample="blur"), 2).state_dict()
    strided = build_model(ModelConfig(downsample="stride"), 2)
    assert any(k.endswith("kernel") for k in blur)
    with pytest.raises(RuntimeError):
        strided.load_state_dict(blur)
