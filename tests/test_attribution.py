"""Attribution API: shapes, agreement with hand computations and captum, batching, completeness,
reproducibility, mask optimisation on a planted region, and the model and inputs left untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from wsi_scaat.saliency import ATTRIBUTION_METHODS, attribute
from wsi_scaat.saliency.attribution import integrated_gradients_with_delta
from wsi_scaat.saliency.mask_opt import _swap, make_baseline

# cheap settings of the methods that iterate
FAST: dict[str, dict] = {
    "smoothgrad": {"n_samples": 4, "seed": 0},
    "integrated_gradients": {"n_steps": 8},
    "mask_opt": {"n_iter": 10, "seed": 0},
    "mask_opt_gd": {"n_iter": 5},
}


def tiny_cnn(seed: int = 0) -> nn.Module:
    """conv, BN, act, conv/2, act, dropout, GAP, linear: 3 classes; the dropout makes train mode visible."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def smooth_cnn(seed: int = 2) -> nn.Module:
    """tanh/softplus CNN with weights scaled up (outputs of order 1): integrated gradients converge fast."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)
    return m.eval()


@pytest.fixture
def model() -> nn.Module:
    m = tiny_cnn()
    with torch.no_grad():  # non-trivial batch-norm statistics, used in eval mode only
        m[1].running_mean.uniform_(-0.2, 0.2)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.train()


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


TARGET = torch.tensor([0, 2, 1, 2])


def hand_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    model.eval()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
    return grad


def test_methods_listed():
    assert set(ATTRIBUTION_METHODS) == {
        "gradient",
        "grad_x_input",
        "smoothgrad",
        "integrated_gradients",
        "gradcam",
        "mask_opt",
        "mask_opt_gd",
    }


@pytest.mark.parametrize("method", ATTRIBUTION_METHODS)
def test_shape_dtype_detached(model, inputs, method):
    attr = attribute(model, inputs, TARGET, method, **FAST.get(method, {}))
    assert attr.shape == inputs.shape
    assert attr.dtype == inputs.dtype and attr.device == inputs.device
    assert not attr.requires_grad and attr.grad_fn is None
    assert torch.isfinite(attr).all()


def test_float32_outputs_under_autocast(model, inputs):
    """Under bf16 autocast the model's layers compute in bf16, but the hooked outputs come out float32."""
    from wsi_scaat.saliency.attribution import float32_outputs

    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(inputs).dtype == torch.bfloat16 and model[3](model[:3](inputs)).dtype == torch.bfloat16
        with float32_outputs(model, model[3]):
            assert model(inputs).dtype == torch.float32 and model[3](model[:3](inputs)).dtype == torch.float32
        assert model(inputs).dtype == torch.bfloat16  # hooks removed
    with float32_outputs(model):
        assert torch.equal(model(inputs), model(inputs))  # float32 outputs are left alone
    assert not model._forward_hooks


@pytest.mark.parametrize("method", ATTRIBUTION_METHODS)
def test_bf16_autocast_gives_float32_attributions_ranked_as_float32(model, inputs, method):
    """Same shape and dtype as in float32; the gradient-based methods rank pixels as in float32 (Spearman
    of the channel-summed maps), the mask optimisations only run (bf16 redirects their search)."""
    kwargs = FAST.get(method, {})
    ref = attribute(model, inputs, TARGET, method, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attr = attribute(model, inputs, TARGET, method, **kwargs)
    assert attr.shape == ref.shape and attr.dtype == torch.float32 and torch.isfinite(attr).all()
    if method.startswith("mask_opt"):
        return
    a, b = (m.abs().sum(1).flatten(1).double() for m in (ref, attr))
    ra, rb = (m.argsort(1).argsort(1).double() for m in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    rho = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    assert rho.min() > 0.95, rho


@pytest.mark.parametrize("method", ATTRIBUTION_METHODS)
@pytest.mark.parametrize("inputs_require_grad", [False, True])
def test_model_and_inputs_left_as_they_were(model, inputs, method, inputs_require_grad):
    model[1].eval()  # mixed modes must come back exactly
    model[0].bias.requires_grad_(False)
    model[-1].weight.grad = torch.ones_like(model[-1].weight)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs.clone().requires_grad_(inputs_require_grad)

    attribute(model, x, TARGET, method, **FAST.get(method, {}))

    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[-1].weight.grad, torch.ones_like(model[-1].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "8.weight")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert x.requires_grad == inputs_require_grad and x.grad is None
    assert torch.equal(x.detach(), inputs)


def test_gradient_is_autograd_of_target_logit_in_eval_mode(model, inputs):
    attr = attribute(model, inputs, TARGET, "gradient")  # model in train mode: dropout must be off
    torch.testing.assert_close(attr, hand_gradient(model, inputs, TARGET), rtol=0, atol=1e-6)
    single = attribute(model, inputs, 2, "gradient")
    torch.testing.assert_close(single, hand_gradient(model, inputs, torch.full((4,), 2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_without_autograd_context(model, inputs, context):
    expected = attribute(model, inputs, TARGET)
    with context():
        x = inputs.clone()
        assert torch.equal(attribute(model, x, TARGET), expected)
        for method in ATTRIBUTION_METHODS:
            assert attribute(model, x, TARGET, method, **FAST.get(method, {})).shape == x.shape


def test_grad_x_input_is_gradient_times_input(model, inputs):
    gxi = attribute(model, inputs, TARGET, "grad_x_input")
    torch.testing.assert_close(gxi, attribute(model, inputs, TARGET) * inputs, rtol=0, atol=1e-7)


def test_float64_inputs_give_float64(model, inputs):
    model.double()
    x = inputs.double()
    attr = attribute(model, x, TARGET, "integrated_gradients", n_steps=8)
    assert attr.dtype == torch.float64
    grad = attribute(model, x, TARGET, "gradient")
    torch.testing.assert_close(grad, hand_gradient(model, x, TARGET), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("method", "kwargs"), [("gradient", {}), ("integrated_gradients", {"n_steps": 16})])
def test_batch_equals_single_samples(model, inputs, method, kwargs):
    batch = attribute(model, inputs, TARGET, method, **kwargs)
    singles = torch.cat(
        [attribute(model, inputs[i : i + 1], TARGET[i : i + 1], method, **kwargs) for i in range(4)]
    )
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-5)


def test_ig_internal_batch_size_does_not_change_result(model, inputs):
    full = attribute(model, inputs, TARGET, "integrated_gradients", n_steps=16)
    chunked = attribute(model, inputs, TARGET, "integrated_gradients", n_steps=16, internal_batch_size=8)
    torch.testing.assert_close(full, chunked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("baseline", ["black", "white", 0.3, "tensor"])
def test_ig_completeness(inputs, baseline):
    model = smooth_cnn()
    base = (
        torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
        if baseline == "tensor"
        else baseline
    )
    attr, delta = integrated_gradients_with_delta(model, inputs, TARGET, baseline=base, n_steps=64)
    ref = make_baseline(inputs, base)
    with torch.no_grad():
        diff = (model(inputs) - model(ref)).gather(1, TARGET[:, None])[:, 0]
    total = attr.sum(dim=(1, 2, 3))
    torch.testing.assert_close(total - diff, delta, rtol=0, atol=1e-5)
    assert (total - diff).abs().max() < 1e-4
    assert diff.abs().max() > 0.1  # the check above is not vacuous


def test_smoothgrad_reproducible_signed_and_leaves_global_rng(model, inputs):
    state = torch.get_rng_state()
    a = attribute(model, inputs, TARGET, "smoothgrad", n_samples=4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = attribute(model, inputs, TARGET, "smoothgrad", n_samples=4, seed=3)
    c = attribute(model, inputs, TARGET, "smoothgrad", n_samples=4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a < 0).any()  # signed: the mean of signed gradients
    plain = attribute(model, inputs, TARGET, "smoothgrad", n_samples=1, noise_level=0.0)
    torch.testing.assert_close(plain, attribute(model, inputs, TARGET), rtol=0, atol=1e-7)


def test_smoothgrad_internal_batch_size_runs(model, inputs):
    attr = attribute(model, inputs, TARGET, "smoothgrad", n_samples=6, internal_batch_size=8, seed=0)
    assert attr.shape == inputs.shape


def test_gradcam_nonnegative_upsampled_and_matches_captum(model, inputs):
    attr = attribute(model, inputs, TARGET, "gradcam")
    assert (attr >= 0).all() and attr.amax() > 0
    assert torch.equal(attr, attr[:, :1].expand_as(attr))  # repeated over channels
    model.eval()
    raw = LayerGradCam(model, model[3]).attribute(inputs, target=TARGET, relu_attributions=True)
    assert raw.shape[-2:] == (8, 8)
    expected = F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(attr[:, :1], expected.detach(), rtol=0, atol=1e-6)
    by_name = attribute(model, inputs, TARGET, "gradcam", layer="3")
    assert torch.equal(by_name, attr)
    first = attribute(model, inputs, TARGET, "gradcam", layer=model[0])
    assert not torch.equal(first, attr)


def test_gradcam_needs_a_conv(inputs):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    with pytest.raises(ValueError, match="Conv2d"):
        attribute(mlp, inputs, 0, "gradcam")


def test_errors(model, inputs):
    with pytest.raises(ValueError, match="gradient.*mask_opt_gd"):
        attribute(model, inputs, 0, "lime")
    with pytest.raises(TypeError, match="n_stepz"):
        attribute(model, inputs, 0, "integrated_gradients", n_stepz=3)
    with pytest.raises(TypeError, match="noise_level"):
        attribute(model, inputs, 0, "gradient", noise_level=0.1)
    with pytest.raises(ValueError, match="shape"):
        attribute(model, inputs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="baseline"):
        attribute(model, inputs, 0, "integrated_gradients", baseline="grey")
    with pytest.raises(ValueError, match="cells"):
        attribute(model, inputs, 0, "mask_opt", cells=0)
    with pytest.raises(ValueError, match="score"):
        attribute(model, inputs, 0, "mask_opt_gd", score="loss")


class RegionModel(nn.Module):
    """Two logits; the second is ``gain * (mean intensity of the top-left r x r region - 0.5)``."""

    def __init__(self, r: int = 8, gain: float = 10.0) -> None:
        super().__init__()
        self.r, self.gain = r, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, : self.r, : self.r].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(v), self.gain * (v - 0.5)], dim=1)


@pytest.fixture
def planted() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.rand(8, 3, 32, 32, generator=g)
    x[:, :, :8, :8] = 0.9 + 0.1 * torch.rand(8, 3, 8, 8, generator=g)
    return x


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("mask_opt", {"seed": 0}),
        ("mask_opt", {"seed": 1, "score": "logit", "baseline": "mean"}),
        ("mask_opt_gd", {}),
        ("mask_opt_gd", {"score": "logit", "l1": 1.0, "tv": 2.0, "baseline": "black"}),
    ],
)
def test_mask_opt_finds_planted_region(planted, method, kwargs):
    attr = attribute(RegionModel(), planted, 1, method, **kwargs)
    assert torch.equal(attr, attr[:, :1].expand_as(attr))
    maps = attr[:, 0]
    assert (maps >= 0).all() and (maps <= 1).all()
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[:8, :8] = True
    inside, outside = maps[:, region].mean(1), maps[:, ~region].mean(1)
    assert (inside > outside + 0.3).all() and (inside > 2 * outside).all()
    peak = maps.flatten(1).argmax(1)
    assert region.flatten()[peak].all()


def test_mask_opt_seeded_and_chunked(planted):
    kw = {"n_iter": 50, "seed": 7}
    a = attribute(RegionModel(), planted, 1, "mask_opt", **kw)
    assert torch.equal(a, attribute(RegionModel(), planted, 1, "mask_opt", **kw))
    chunked = attribute(RegionModel(), planted, 1, "mask_opt", internal_batch_size=3, **kw)
    torch.testing.assert_close(chunked, a, rtol=0, atol=1e-6)
    assert not torch.equal(a, attribute(RegionModel(), planted, 1, "mask_opt", n_iter=50, seed=8))
    two = attribute(RegionModel(), planted, 1, "mask_opt", n_chains=2, **kw)
    assert two.shape == planted.shape and not torch.equal(two, a)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 40),
    data=st.data(),
)
def test_swap_keeps_area_and_moves_n_swaps_cells(n, data):
    k = data.draw(st.integers(1, n - 1))
    n_swaps = data.draw(st.integers(1, min(k, n - k)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    mask = torch.zeros(3, n, dtype=torch.bool)
    mask[:, torch.randperm(n, generator=g)[:k]] = True
    out = _swap(mask, n_swaps, g)
    assert (out.sum(1) == k).all()
    assert ((out & ~mask).sum(1) == n_swaps).all() and ((mask & ~out).sum(1) == n_swaps).all()


def benchmark(batch: int = 64, size: int = 48, repeats: int = 1) -> dict[str, float]:
    """Seconds per call of each method (default options) on SmallCNN(width=32) (4 convs 32-64-128-128)."""
    import time

    from wsi_scaat.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small_cnn", width=32), num_classes=2).eval()
    x = torch.rand(batch, 3, size, size)
    target = torch.randint(0, 2, (batch,))
    extra = {"smoothgrad": {"seed": 0}, "mask_opt": {"seed": 0}}
    attribute(model, x, target, "mask_opt_gd", n_iter=1)  # warm-up (lazy imports of the optimiser)
    times = {}
    for method in ATTRIBUTION_METHODS:
        start = time.perf_counter()
        for _ in range(repeats):
            attribute(model, x, target, method, **extra.get(method, {}))
        times[method] = (time.perf_counter() - start) / repeats
    return times


if __name__ == "__main__":  # python tests/test_attribution.py: the runtime table
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, seconds in benchmark().items():
        print(f"{name:22s} {seconds:8.3f} s")
