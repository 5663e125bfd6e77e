"""Attribution methods behind one function, :func:`attribute`.

Every method maps a (B, C, H, W) batch in [0, 1] pixel units (the model normalises internally) and its
target classes to per-channel attributions (B, C, H, W), detached, in the inputs' dtype and device:

* ``gradient``: signed input gradient of the target logit (captum ``Saliency(abs=False)``).
* ``grad_x_input``: gradient times input (captum ``InputXGradient``).
* ``smoothgrad``: captum ``NoiseTunnel(Saliency)``, ``nt_type="smoothgrad"``: the mean of the *signed*
  gradients at ``n_samples`` noisy copies ``x + N(0, noise_level**2)`` (pixel units, not clipped), so
  ``n_samples=1, noise_level=0`` is exactly ``gradient``; take ``abs()`` for the usual display.
* ``integrated_gradients``: captum ``IntegratedGradients`` (Gauss-Legendre, ``n_steps``) from a
  ``baseline`` (``"black"`` zeros, ``"white"`` ones, ``"mean"``, ``"blur"``, a float or a tensor);
  :func:`integrated_gradients_with_delta` also returns captum's completeness delta.
* ``gradcam``: captum ``LayerGradCam`` on ``layer`` (default: the model's last ``nn.Conv2d``), ReLU,
  upsampled bilinearly to H x W and repeated over the C channels: its channel sum is C times the map.
* ``mask_opt``, ``mask_opt_gd``: mask-optimisation saliency (:mod:`wsi_scaat.saliency.mask_opt`),
  also repeated over the channels.

``internal_batch_size`` bounds the images per forward pass of the methods that expand the batch
(``smoothgrad``: at least one noisy copy of the batch per pass; ``integrated_gradients``;
``mask_opt``). ``seed`` makes ``smoothgrad`` and ``mask_opt`` reproducible without touching the
caller's RNG state.

During attribution the model is in eval mode and its parameters do not require gradients (only input
gradients are computed); afterwards every module's training flag and every parameter's
``requires_grad`` are restored, nothing is written to ``.grad`` and the inputs are untouched. It may
be called under ``torch.no_grad()`` or ``torch.inference_mode()``, and under ``torch.autocast``
(bfloat16): the model's layers then compute in bfloat16, but its outputs (and Grad-CAM's layer
activations) are cast to float32, so scores, probabilities, gradients and every sum over samples,
steps or channels are float32 like the inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from torch import nn

from wsi_scaat.saliency.mask_opt import make_baseline, mask_opt, mask_opt_gd

Method = Callable[..., torch.Tensor]


@contextmanager
def attribution_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with parameters not requiring grad; both restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Seed the global RNG of ``device`` for the block and restore its state afterwards (no-op for None)."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


@contextmanager
def float32_outputs(*modules: nn.Module) -> Iterator[None]:
    """Within the block, floating outputs of ``modules`` below float32 (autocast's) are cast to float32."""

    def hook(_: nn.Module, __: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and out.dtype in (torch.float16, torch.bfloat16):
            return out.float()
        return None

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _grad_mode() -> Iterator[None]:
    """Autograd on, also when the caller is under ``torch.no_grad`` or ``torch.inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last ``nn.Conv2d`` of ``model`` in module registration order."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("gradcam needs an nn.Conv2d in the model, or pass layer=")
    return convs[-1]


def _gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Signed input gradient of the target logit."""
    return Saliency(model).attribute(x, target=target, abs=False)


def _grad_x_input(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Input gradient times input."""
    return InputXGradient(model).attribute(x, target=target)


def _smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    noise_level: float = 0.1,
    n_samples: int = 16,
    internal_batch_size: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Mean signed gradient over ``n_samples`` copies with Gaussian noise of std ``noise_level``."""
    if n_samples < 1 or noise_level < 0:
        raise ValueError("smoothgrad needs n_samples >= 1 and noise_level >= 0")
    per_pass = None if internal_batch_size is None else max(1, internal_batch_size // x.shape[0])
    with seeded(x.device, seed):
        return NoiseTunnel(Saliency(model)).attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=n_samples,
            nt_samples_batch_size=per_pass,
            stdevs=float(noise_level),
            target=target,
            abs=False,
        )


def _ig(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    baseline: str | float | torch.Tensor = "black",
    n_steps: int = 32,
    internal_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    attr, delta = IntegratedGradients(model).attribute(
        x,
        baselines=make_baseline(x.detach(), baseline),
        target=target,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    return attr, delta


def _integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    baseline: str | float | torch.Tensor = "black",
    n_steps: int = 32,
    internal_batch_size: int | None = None,
) -> torch.Tensor:
    """Integrated gradients from ``baseline`` (default black) with ``n_steps`` Gauss-Legendre steps."""
    return _ig(model, x, target, baseline=baseline, n_steps=n_steps, internal_batch_size=internal_batch_size)[
        0
    ]


def _gradcam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer: nn.Module | str | None = None
) -> torch.Tensor:
    """ReLU Grad-CAM of ``layer`` (a module or its dotted name), bilinear to H x W, repeated over C."""
    if layer is None:
        layer = last_conv(model)
    elif isinstance(layer, str):
        layer = model.get_submodule(layer)
    with float32_outputs(layer):  # activations and their gradients in float32 under autocast
        cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return cam.repeat(1, x.shape[1], 1, 1)


_METHODS: dict[str, Method] = {
    "gradient": _gradient,
    "grad_x_input": _grad_x_input,
    "smoothgrad": _smoothgrad,
    "integrated_gradients": _integrated_gradients,
    "gradcam": _gradcam,
    "mask_opt": mask_opt,
    "mask_opt_gd": mask_opt_gd,
}
ATTRIBUTION_METHODS: tuple[str, ...] = tuple(_METHODS)


def _check_kwargs(method: str, fn: Method, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    accepted = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"attribution method {method!r} got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )


def _prepare(inputs: torch.Tensor, target: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs detached with ``requires_grad`` (the caller's tensor is untouched) and (B,) int64 targets."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        raise ValueError("inputs must be a floating-point (B, C, H, W) tensor")
    b = inputs.shape[0]
    t = torch.as_tensor(target, device=inputs.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"target must be an int or integer class indices, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"target must be an int or of shape ({b},), got shape {tuple(t.shape)}")
    x = inputs.detach()
    if x.is_inference():  # a normal tensor that autograd can use
        with torch.inference_mode(False):
            x = x.clone()
    return x.requires_grad_(True), t.contiguous()


def _method(method: str) -> Method:
    if method not in _METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid: {', '.join(ATTRIBUTION_METHODS)}")
    return _METHODS[method]


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor | int,
    method: str = "gradient",
    **kwargs: Any,
) -> torch.Tensor:
    """Attributions (B, C, H, W) of ``model``'s ``target`` class(es) for ``inputs`` by ``method``.

    ``inputs`` (B, C, H, W) in [0, 1]; ``target`` an int or (B,) class indices; ``kwargs`` the options
    of ``method`` (see the module docstring). Raises ``ValueError`` for an unknown method and
    ``TypeError`` for an option the method does not take. The result is detached, in the inputs' dtype
    and device; the model and the inputs are left as they were.
    """
    fn = _method(method)
    _check_kwargs(method, fn, kwargs)
    x, t = _prepare(inputs, target)
    with _grad_mode(), attribution_mode(model), float32_outputs(model):
        attr = fn(model, x, t, **kwargs)
    return attr.detach().to(dtype=inputs.dtype)


def integrated_gradients_with_delta(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``integrated_gradients`` attributions and captum's per-sample completeness delta.

    ``delta = attr.sum over (C, H, W) - (f_t(inputs) - f_t(baseline))``; options as for
    ``attribute(..., method="integrated_gradients")``.
    """
    _check_kwargs("integrated_gradients", _integrated_gradients, kwargs)
    x, t = _prepare(inputs, target)
    with _grad_mode(), attribution_mode(model), float32_outputs(model):
        attr, delta = _ig(model, x, t, **kwargs)
    return attr.detach().to(dtype=inputs.dtype), delta.detach()
