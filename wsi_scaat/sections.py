"""Config sections of the stages that need no deep-learning stack (cohort, synth, tissue, tiling,
saliency, stitch, export, evaluate).

They live apart from :mod:`wsi_scaat.config` so that the ``wsi-scaat`` command can take its
defaults and help texts from them (one source of truth) without importing torch or albumentations:
tiling, stitching and export jobs start in a fraction of a second. ``wsi_scaat.config`` re-exports
every class.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from wsi_scaat.schema import Section

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def field_default(section: type[Section], name: str) -> Any:
    """The default of field ``name`` of ``section`` (what the CLI offers when a flag is left out)."""
    return section.model_fields[name].get_default(call_default_factory=True)


def field_help(section: type[Section], name: str) -> str:
    """The description of field ``name`` of ``section`` (the CLI's help text)."""
    return section.model_fields[name].description or ""


class CohortConfig(Section):
    name: str = Field(description="cohort name; outputs go to <results_dir>/<name>/")
    manifest: Path = Field(description="CSV with slide_id,path,split,label,annotations[,mpp]")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a folder)")
        return v


class SynthConfig(Section):
    out: Path = Field(description="cohort folder to write")
    slides: int = Field(6, ge=1, le=10000, description="number of slides")
    width: int = Field(4096, ge=256, le=200_000, description="slide width in pixels")
    height: int = Field(4096, ge=256, le=200_000, description="slide height in pixels")
    seed: int = Field(0, description="random seed; the same seed gives identical files")
    mpp: float = Field(0.5, gt=0, le=100, description="microns per pixel written in the slides")
    lesion_slide_fraction: float = Field(0.5, ge=0, le=1, description="fraction of slides carrying lesions")
    difficulty: Literal["easy", "hard"] = Field(
        "easy",
        description="easy: lesions are dense dark regions; hard: lesions differ from normal tissue in "
        "nuclear morphology only, every slide has its own stain (docs/synthetic.md)",
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="shares of the slides in the splits train, val and test"
    )

    @field_validator("split_fractions")
    @classmethod
    def _shares(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or sum(v) <= 0:
            raise ValueError("three non-negative numbers, not all zero")
        return v


class TissueConfig(Section):
    """Tissue detection: Otsu on saturation of a thumbnail, closing, hole filling, small-region removal."""

    thumbnail_mpp: float = Field(8.0, gt=0, le=256, description="resolution of tissue detection (um/px)")
    min_saturation: float = Field(
        0.05, ge=0, le=1, description="floor of the Otsu saturation threshold (faint stains: lower it)"
    )
    closing_um: float = Field(40.0, ge=0, le=10_000, description="diameter of the morphological closing (um)")
    min_area_um2: float = Field(
        1000.0,
        ge=0,
        description="smallest tissue region kept (um^2); small enough for biopsy fragments, large for dust",
    )
    max_hole_um2: float = Field(20000.0, ge=0, description="holes smaller than this (um^2) are filled")


class TilingConfig(Section):
    patch_size: int = Field(256, ge=8, le=4096, description="patch side in output pixels")
    target_mpp: float = Field(0.5, gt=0, le=100, description="microns per pixel of the patches")
    overlap: int = Field(0, ge=0, description="pixels shared by neighbouring patches")
    min_tissue: float = Field(0.5, ge=0, le=1, description="minimum tissue fraction of a kept patch")
    format: Literal["h5", "zarr"] = Field("h5", description="patch store format")
    compression: Literal["lz4", "zstd", "gzip", "none"] = Field("lz4", description="patch chunk codec")
    region_size: int = Field(1024, ge=256, le=32768, description="level pixels per region read at once")
    label_threshold: float = Field(
        0.5, gt=0, le=1, description="lesion fraction from which a patch is labelled 1"
    )
    annotation_class: str = Field("lesion", description="GeoJSON classification name of the lesions")

    @field_validator("overlap")
    @classmethod
    def _overlap_below_patch(cls, v: int, info: Any) -> int:
        size = info.data.get("patch_size")
        if size is not None and v >= size:
            raise ValueError(f"must be smaller than patch_size ({size})")
        return v


Attribution = Literal[
    "gradient", "grad_x_input", "smoothgrad", "integrated_gradients", "gradcam", "mask_opt", "mask_opt_gd"
]


class SaliencyConfig(Section):
    method: Attribution = Field("gradient", description="attribution method (see wsi_scaat.saliency)")
    target: str = Field("predicted", description="'predicted' or a class name")
    map_downsample: int = Field(1, ge=1, le=64, description="patch maps stored at patch_size / this")
    batch_size: int = Field(128, ge=1, le=65536, description="patches per batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto, cpu or cuda")
    amp: bool | Literal["auto"] = Field(
        "auto",
        description="model passes under bfloat16 autocast, maps accumulated in float32; auto: where the "
        "device computes bf16 natively (CUDA with bf16, AVX512-BF16 or AMX CPUs), gradient methods only",
    )
    options: dict[str, float | int | str] = Field(
        default_factory=dict, description="method keyword arguments"
    )
    splits: list[str] | None = Field(
        None, description="manifest splits explained, stitched and exported (null: every slide)"
    )
    overlap: int = Field(
        0, ge=0, le=4096,
        description="patch pixels shared by neighbouring explained patches (extra patches cut between the "
        "store's; e.g. half a patch, so that blending hides the patch borders); 0: the store's patches only",
    )  # fmt: skip


class StitchConfig(Section):
    value: Literal["saliency", "evidence", "weighted", "probability"] = Field(
        "probability",  # the best held-out slide heatmap AUROC on the real and hard cohorts (docs/qupath.md)
        description="what the heatmap shows: saliency (|attribution|), evidence (attribution > 0), weighted "
        "(saliency x p(target)) or probability (p(target) over each patch)",
    )
    chunk: int = Field(1024, ge=64, le=16384, description="heatmap chunk side (pixels)")
    window: Literal["hann", "flat"] = Field("hann", description="blending window of overlapping patches")
    low_percentile: float = Field(1.0, ge=0, le=100, description="normalisation: low clip percentile")
    high_percentile: float = Field(99.0, ge=0, le=100, description="normalisation: high clip percentile")
    mask_tissue: bool = Field(True, description="zero the heatmap outside the tissue mask")
    scheduler: str | None = Field(None, description="dask.distributed scheduler address; null: local threads")

    @field_validator("high_percentile")
    @classmethod
    def _ordered(cls, v: float, info: Any) -> float:
        low = info.data.get("low_percentile")
        if low is not None and v <= low:
            raise ValueError(f"must be above low_percentile ({low})")
        return v


class ExportConfig(Section):
    colormap: str = Field("inferno", description="matplotlib colormap")
    overlay_alpha: float = Field(
        0.75, ge=0, le=1, description="overlay opacity at heatmap values >= overlay_high"
    )
    overlay_low: float = Field(
        0.2, ge=0, lt=1, description="heatmap value up to which the overlay leaves the tissue untouched"
    )
    overlay_high: float = Field(
        0.5, gt=0, le=1, description="heatmap value from which the overlay is fully coloured (overlay_alpha)"
    )
    display_smooth_um: float = Field(
        10.0, ge=0, le=1000,
        description="Gaussian sigma (um) of the heatmap in the PNGs and the figure (the pyramid and the "
        "OME-TIFFs keep the unsmoothed values)",
    )  # fmt: skip
    region_threshold: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="heatmap value as shown (smoothed, display scale) outlining high-saliency regions",
    )
    min_region_area_um2: float = Field(2000.0, ge=0, description="smallest high-saliency region kept (um^2)")
    region_smooth_um: float = Field(
        8.0, ge=0, le=1000, description="Gaussian sigma (um) before tracing regions"
    )
    thumbnail_size: int = Field(2048, ge=64, le=16384, description="longer side of the PNGs (pixels)")
    tile_size: int = Field(512, ge=64, le=4096, description="OME-TIFF tile side (pixels)")

    @field_validator("overlay_high")
    @classmethod
    def _above_low(cls, v: float, info: Any) -> float:
        low = info.data.get("overlay_low")
        if low is not None and v <= low:
            raise ValueError(f"must be above overlay_low ({low})")
        return v

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, v: str) -> str:
        import matplotlib

        if v not in matplotlib.colormaps:
            raise ValueError(f"unknown matplotlib colormap {v!r}")
        return v


class EvaluateConfig(Section):
    splits: list[str] = Field(["test"], min_length=1, description="manifest splits evaluated (held out)")
    max_patches: int = Field(
        512, ge=8, le=1_000_000, description="patches per model for faithfulness and reconstruction"
    )
    batch_size: int = Field(128, ge=1, le=65536)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deletion_steps: int = Field(16, ge=2, le=1024, description="steps of the deletion / insertion curves")
    road_percentages: list[float] = Field(
        [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1, description="fractions of pixels ROAD removes"
    )
    reconstruction_keep: float = Field(
        0.5, gt=0, lt=1, description="fraction of most salient pixels the reconstruction check keeps"
    )
    figure_patches: int = Field(6, ge=1, le=64, description="rows of the figure grid")
    seed: int = 0
    seeds: int = Field(
        1,
        ge=1,
        le=100,
        description="training seeds per run (train.seed, train.seed + 1, ...); a train.runs entry may "
        "set its own `seeds`; the first seed's model keeps the run's name, the others are <run>.s<seed>",
    )
    reference: str = Field("erm", description="run the tables compare every other run with (paired)")
    bootstrap: int = Field(
        2000, ge=100, le=100_000, description="bootstrap replicates (held-out slides and seeds resampled)"
    )
    mixed_fraction: tuple[float, float] = Field(
        (0.1, 0.9), description="lesion fraction range of the patches patch-level localisation rests on"
    )
    tissue_classes: list[str] | None = Field(
        None,
        description="annotation classes whose union is tissue for localisation (e.g. tumour, stroma, "
        "normal); null: the tiling's tissue mask",
    )
    ignore_band: tuple[float, float] | None = Field(
        None,
        description="classification figures leave out patches with low < lesion fraction < high "
        "(ambiguous labels; as train.ignore_band); null: every patch",
    )
    randomisation: bool = Field(True, description="model-randomisation sanity check (Adebayo et al., 2018)")
    road: bool = Field(True, description="ROAD (noisy linear imputation; the slowest faithfulness metric)")
    reconstruction: bool = Field(True, description="reconstruction check (donor fill)")

    @field_validator("mixed_fraction", "ignore_band")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1] <= 1:
            raise ValueError("two fractions 0 <= low < high <= 1")
        return v

    @field_validator("road_percentages")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v) or sorted(set(v)) != v:
            raise ValueError("increasing fractions strictly between 0 and 1")
        return v
