"""The patch saliency stage: class probabilities and saliency maps for every patch of a store.

Reads the patch store in contiguous batches (the next batch is read while the current one is
computed), runs the model on CUDA when available, and writes ``<slide_id>.saliency.zarr``
(see :mod:`wsi_scaat.saliency.store`). For ``gradient`` and ``grad_x_input`` one forward pass
gives both the probabilities and the map (forward + backward per batch, the floor of any
gradient method); other methods add their own passes. Each patch keeps two maps: the channel sum of
|attribution| (``maps``) and of the signed attribution (``signed``). With ``overlap`` > 0, extra
patches cut between the store's patches (:mod:`wsi_scaat.saliency.overlap`) are explained too and
written to the store's ``overlap`` group, so that stitching can blend away the patch borders.

With ``amp`` (``saliency.amp``) the model's passes run under bfloat16 autocast on channels-last
batches; the inputs, their gradients, the maps and the probabilities stay float32 (see
docs/benchmarks.md for how far such maps are from float32 maps). ``auto`` does so where the device
computes bfloat16 natively, for the gradient-based methods of :data:`AMP_AUTO_METHODS`; the mask
optimisations stay float32 under ``auto`` (bf16 rounding redirects their search: rank correlation
with float32 maps down to 0.6, measured). The store records the precision in ``saliency_precision``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsi_scaat import __version__
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.manifest import check_slide_id
from wsi_scaat.saliency.overlap import OverlapPlan, overlap_patches, plan_overlap
from wsi_scaat.saliency.store import SUFFIX, SaliencyWriter, create_saliency_store
from wsi_scaat.sections import SaliencyConfig
from wsi_scaat.sections import field_default as _d
from wsi_scaat.store import open_store
from wsi_scaat.training.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from wsi_scaat.training.loop import Runtime

#: Largest relative difference between the store's patch mpp and the model's.
MPP_TOLERANCE = 0.05
#: Attribution methods that ``amp: auto`` runs under bfloat16 autocast (where native).
AMP_AUTO_METHODS = ("gradient", "grad_x_input", "smoothgrad", "integrated_gradients", "gradcam")


class SaliencyError(WsiScaatError):
    """The model and the patch store do not fit together, or the target is unknown."""


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a checkpoint (eval mode, on ``device``) and the checkpoint dict."""
    from wsi_scaat.models import ModelConfig, build_model

    state = load_checkpoint(checkpoint, map_location="cpu")
    # checkpoints from before `downsample` existed were all strided
    cfg = ModelConfig(**{"downsample": "stride", **state["model_config"], "weights": None})
    model = build_model(cfg, len(state["class_names"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def resolve_target(target: str, class_names: list[str]) -> int | None:
    """``predicted`` -> None (each patch's predicted class); a class name or index -> its index."""
    if target == "predicted":
        return None
    if target in class_names:
        return class_names.index(target)
    if target.isdigit() and int(target) < len(class_names):
        return int(target)
    raise SaliencyError(
        None, f"target {target!r} is neither 'predicted' nor one of the classes {class_names}"
    )


def _check_fit(store_attrs: dict, state: dict, store_path: Path) -> None:
    size, mpp = state.get("patch_size"), state.get("patch_mpp")
    if size is not None and int(store_attrs["patch_size_out"]) != int(size):
        raise SaliencyError(
            store_path,
            f"patches are {store_attrs['patch_size_out']} px but the model was trained on {size} px "
            f"patches; re-tile with --patch-size {size}",
        )
    have = float(store_attrs.get("patch_mpp", store_attrs["target_mpp"]))
    if mpp is not None and abs(have - mpp) > MPP_TOLERANCE * mpp:
        raise SaliencyError(
            store_path,
            f"patches are at {have:.3f} mpp but the model was trained at {mpp:.3f} mpp; "
            f"re-tile with --target-mpp {mpp:g}",
        )


def explain_batch(
    model: torch.nn.Module,
    x: torch.Tensor,
    fixed_target: int | None,
    method: str,
    options: dict[str, Any],
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities (B, K), targets (B,), channel-summed |attribution| (B, H, W) and channel-summed
    signed attribution (B, H, W) of a batch.

    With ``amp_dtype`` the model runs under autocast to it; probabilities and maps are float32.
    """
    if amp_dtype is None:
        return _explain(model, x, fixed_target, method, options)
    with torch.autocast(x.device.type, dtype=amp_dtype):
        probs, target, maps, signed = _explain(model, x, fixed_target, method, options)
    return probs, target, maps.float(), signed.float()


def _explain(
    model: torch.nn.Module, x: torch.Tensor, fixed_target: int | None, method: str, options: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if method in ("gradient", "grad_x_input"):  # one forward serves probabilities and map
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xg)
            target = (
                logits.argmax(1)
                if fixed_target is None
                else torch.full_like(logits[:, 0], fixed_target).long()
            )
            (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg)
        attr = grad * x if method == "grad_x_input" else grad
        probs = F.softmax(logits.detach().float(), 1)
    else:
        from wsi_scaat.saliency import attribute

        with torch.no_grad():
            probs = F.softmax(model(x).float(), 1)
        target = (
            probs.argmax(1) if fixed_target is None else torch.full_like(probs[:, 0], fixed_target).long()
        )
        attr = attribute(model, x, target, method, **options)
    return probs, target, attr.abs().sum(1), attr.sum(1)


def run_saliency(
    checkpoint: str | Path,
    store: str | Path,
    out_dir: str | Path,
    *,
    method: str = _d(SaliencyConfig, "method"),
    target: str = _d(SaliencyConfig, "target"),
    map_downsample: int = _d(SaliencyConfig, "map_downsample"),
    batch_size: int = _d(SaliencyConfig, "batch_size"),
    device: str = _d(SaliencyConfig, "device"),
    amp: bool | str = _d(SaliencyConfig, "amp"),
    options: dict[str, Any] | None = None,
    progress: bool | None = None,
    overlap: int = _d(SaliencyConfig, "overlap"),
) -> Path:
    """Write ``out_dir/<slide_id>.saliency.zarr`` for every patch of ``store`` (and, with ``overlap``
    px > 0, for the extra patches between them); returns its path."""
    from wsi_scaat.training.loop import Runtime, amp_dtype, resolve_device, use_channels_last

    options = dict(options or {})
    if method in ("integrated_gradients", "smoothgrad"):
        options.setdefault("internal_batch_size", batch_size)  # bound the expanded batch's memory
    dev = resolve_device(device)
    dtype = amp_dtype(dev, amp, fp16=False) if amp != "auto" or method in AMP_AUTO_METHODS else None
    rt = Runtime(dev, dtype, dtype is not None and use_channels_last(dev, "auto"))
    model, state = load_model(checkpoint, dev)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)  # input gradients only
    class_names = list(state["class_names"])
    fixed = resolve_target(target, class_names)
    patches = open_store(store)
    try:
        attrs = patches.attrs
        _check_fit(attrs, state, patches.path)
        size = patches.patch_size
        if size % map_downsample:
            raise SaliencyError(
                None, f"map downsample {map_downsample} does not divide the patch size {size}"
            )
        map_size = size // map_downsample
        try:
            extra = plan_overlap(patches.coords, attrs, overlap)
        except WsiScaatError as exc:
            raise SaliencyError(patches.path, exc.cause) from None
        try:  # the id names the output: never a path out of out_dir
            slide_id = check_slide_id(str(attrs["slide_id"]))
        except ValueError as exc:
            raise SaliencyError(patches.path, str(exc)) from None
        out = Path(out_dir) / f"{slide_id}{SUFFIX}"
        meta = {
            **attrs,
            "saliency_method": method,
            "saliency_target": target,
            "map_downsample": map_downsample,
            "map_size": map_size,
            "class_names": class_names,
            "checkpoint": str(Path(checkpoint).resolve()),
            "model_method": state.get("method"),
            "model_epoch": state.get("epoch"),
            "saliency_options": options or {},
            "saliency_overlap": int(overlap),
            "n_overlap": len(extra),
            "saliency_precision": rt.precision,
            "wsi_scaat_version": __version__,
        }
        explain_store(model, patches, out, meta, len(class_names), fixed, method, options, batch_size,
                      map_downsample, rt, extra, progress)  # fmt: skip
    finally:
        patches.close()
    return out


def explain_store(model: torch.nn.Module, patches: Any, out: Path, meta: dict[str, Any], n_classes: int,
                  fixed: int | None, method: str, options: dict[str, Any], batch_size: int, downsample: int,
                  dev: torch.device | Runtime, extra: OverlapPlan,
                  progress: bool | None = None) -> Path:  # fmt: skip
    """Write the saliency store ``out`` of the open patch store ``patches`` with ``model`` (attributes
    ``meta``, which must hold ``map_size``) on ``dev`` (a device: float32; or a :class:`Runtime`);
    the ``extra`` patches go to its ``overlap`` group."""
    from wsi_scaat.training.loop import Runtime

    rt = dev if isinstance(dev, Runtime) else Runtime(torch.device(dev), None, False)
    n, map_size = len(patches), int(meta["map_size"])
    with create_saliency_store(out, n, n_classes, map_size, meta, signed=True) as writer:
        writer.write_array("coords", patches.coords)
        if "tissue_mask" in patches:
            writer.write_array("tissue_mask", patches.array("tissue_mask"))
        total = n + len(extra)
        disable = None if progress is None else not progress
        with tqdm(total=total, unit="patch", desc="saliency", disable=disable) as bar:
            batches = (np.asarray(patches.imgs[s : s + batch_size]) for s in range(0, n, batch_size))
            _fill(writer, batches, model, rt, fixed, method, options, downsample, bar)
            if len(extra):
                sub = writer.overlap(len(extra), n_classes, map_size)
                sub.write_array("coords", extra.coords)
                _fill(sub, overlap_patches(patches.imgs, extra, batch_size), model, rt, fixed, method,
                      options, downsample, bar)  # fmt: skip
    return out


def _fill(writer: SaliencyWriter, batches: Iterator[np.ndarray], model: torch.nn.Module,
          rt: Runtime, fixed: int | None, method: str, options: dict[str, Any], downsample: int,
          bar: tqdm) -> None:  # fmt: skip
    """Explain the (B, P, P, 3) uint8 ``batches`` in order (the next read while one is computed)."""

    def read() -> torch.Tensor | None:
        imgs = next(batches, None)
        return None if imgs is None else torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255)

    start = 0
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read)
        while (x := pending.result()) is not None:
            pending = pool.submit(read)  # read ahead while computing
            x = rt.to_device(x)
            probs, target, maps, signed = explain_batch(model, x, fixed, method, options, rt.amp_dtype)
            if downsample > 1:
                maps = F.avg_pool2d(maps[:, None], downsample)[:, 0]
                signed = F.avg_pool2d(signed[:, None], downsample)[:, 0]
            writer.write(start, maps.cpu().numpy(), probs.cpu().numpy(), target.cpu().numpy(),
                         signed=signed.cpu().numpy())  # fmt: skip
            start += len(x)
            bar.update(len(x))
