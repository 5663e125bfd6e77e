"""Config sections of training that need no deep-learning stack: the model, the augmentation and
each training method's knobs.

They live apart from the modules that use them (``wsi_scaat.models``, ``wsi_scaat.data.augment``,
``wsi_scaat.training.methods``), which import torch and albumentations, so that validating a config
(every Snakemake process, every ``wsi-scaat`` job) stays light: a 10,000-slide workflow builds its
DAG without loading torch. Those modules re-export their section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from wsi_scaat.schema import Section


class ModelConfig(Section):
    """The patch classifier."""

    name: Literal["small_cnn", "resnet18", "efficientnet_b0"] = Field("small_cnn", description="backbone")
    width: int = Field(32, ge=4, le=1024, description="base channels of small_cnn")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before small_cnn's linear head")
    downsample: Literal["stride", "blur", "avgpool"] = Field(
        "blur",
        description="how small_cnn halves the resolution: stride-2 convolutions (their input gradients "
        "alias onto the pixel grid), blur then stride (anti-aliased), or average pooling",
    )
    weights: Path | None = Field(
        None, description="local state_dict or checkpoint (key 'model') to start from; None = random init"
    )
    mean: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="input normalisation mean")
    std: tuple[float, float, float] = Field((0.25, 0.25, 0.25), description="input normalisation std")

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("std must be positive")
        return v


class AugmentConfig(Section):
    """Training-time patch augmentation (evaluation never augments)."""

    flips: bool = Field(True, description="random horizontal and vertical flips")
    rotate90: bool = Field(True, description="random rotation by a multiple of 90 degrees")
    color_jitter: float = Field(
        0.1, ge=0, le=1, description="brightness/contrast/saturation strength; hue = strength/4; 0 = off"
    )
    hed_jitter: float = Field(
        0.0, ge=0, le=1, description="sigma of the HED-space stain jitter of Tellez et al.; 0 = off"
    )
    blur_prob: float = Field(0.0, ge=0, le=1, description="probability of a Gaussian blur, sigma in [0.1, 1]")
    stain_augmentor: bool = Field(
        False, description="tiatoolbox Macenko StainAugmentor (sigma1=0.4, sigma2=0.2)"
    )
    stain_reference: Path | None = Field(
        None, description="RGB image to fit the StainAugmentor's stain matrix on; None = fit on each patch"
    )


class ScaatConfig(Section):
    """Knobs of SCAAT (``train.scaat``)."""

    mask_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="fraction of each patch's pixels (least salient first) that may be perturbed",
    )
    eps: float = Field(0.1, ge=0, le=1, description="l-inf budget (pixel units) of the least salient pixel")
    gamma: float = Field(
        1.0, ge=0, le=100, description="budget decay: eps_i = eps * (1 - r_i) ** gamma, r_i = saliency rank"
    )
    steps: int = Field(1, ge=0, le=100, description="PGD sign-steps after the random start")
    alpha: float | None = Field(None, gt=0, le=1, description="PGD step size in pixel units; null: eps")
    lam: float = Field(1.0, ge=0, le=1000, description="weight of the KL(clean || perturbed) term")
    warmup_epochs: float = Field(
        2.0, ge=0, le=1000, description="epochs of linear mask_ratio ramp-up from 0 (0: none)"
    )
    bf16_search: bool | Literal["auto"] = Field(
        "auto",
        description="saliency and PGD passes under bfloat16 autocast (faster; loss unchanged); "
        "auto: where the hardware computes bf16 natively",
    )
    saliency_bn: Literal["train", "eval"] = Field(
        "eval",
        description="BatchNorm mode of the saliency pass that ranks pixels: batch statistics (train) or "
        "running statistics (eval, as the saliency maps users see are computed)",
    )
    rank_saliency: Literal["gradient", "smoothed_input"] = Field(
        "gradient",
        description="the saliency that ranks pixels: the input gradient, or the gradient at a "
        "Gaussian-smoothed input (sigma rank_sigma pixels)",
    )
    rank_sigma: float = Field(1.0, gt=0, le=16, description="sigma (pixels) of rank_saliency: smoothed_input")
    mask: Literal["lowest", "sampled"] = Field(
        "lowest",
        description="perturbable pixels: the lowest-saliency mask_ratio of them, or each drawn with a "
        "probability falling linearly with its saliency rank (mask_ratio of them on average)",
    )
    detach_target: bool = Field(
        True,
        description="treat the clean distribution as a constant in the KL term (false: it is trained too)",
    )
    kl: Literal["forward", "symmetric"] = Field(
        "forward",
        description="KL(clean || perturbed), or the mean of both directions",
    )


class AdvGradConfig(Section):
    """Knobs of norm-regularised adversarial training (``train.advgrad``)."""

    variant: Literal["l1", "elastic", "group"] = Field(
        "l1", description="gradient norm penalised: l1, elastic (l1 + squared l2) or group (sum of group l2)"
    )
    mode: Literal["fast", "iterative"] = Field(
        "fast", description="fast: one-gradient closed form; iterative: `steps` projected ascent steps"
    )
    eps: float = Field(0.01, ge=0, le=1, description="attack radius, pixel units (elastic: eps1, l1 weight)")
    eps2: float = Field(0.01, gt=0, le=100, description="elastic only: squared-l2 penalty weight")
    group_size: int = Field(4, ge=1, le=1024, description="group only: side G of the G x G groups")
    steps: int = Field(7, ge=1, le=1000, description="iterative only: number of ascent steps")
    step_size: float = Field(
        0.3, gt=0, le=10, description="iterative step: x eps for l1/group; per-sample l2 length for elastic"
    )


class SgtConfig(Section):
    """Knobs of saliency guided training (``train.sgt``)."""

    mask_fraction: float = Field(
        0.5, ge=0, le=1, description="fraction of input elements (least salient first) set to noise"
    )
    lam: float = Field(1.0, ge=0, le=1000, description="weight of the KL(clean || masked) term")
