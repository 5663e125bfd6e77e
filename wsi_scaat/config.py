"""Validated configuration: one pydantic model per section, unknown keys rejected.

``load_config`` reads one or more YAML files (later ones override earlier ones, as Snakemake's
``--configfile`` does) and stops with an error naming the offending key before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from wsi_scaat.errors import ConfigError
from wsi_scaat.learning_sections import AdvGradConfig, AugmentConfig, ModelConfig, ScaatConfig, SgtConfig
from wsi_scaat.schema import Section
from wsi_scaat.sections import (  # noqa: F401 - re-exported: every section is importable from here
    NAME_RE,
    CohortConfig,
    EvaluateConfig,
    ExportConfig,
    SaliencyConfig,
    StitchConfig,
    SynthConfig,
    TilingConfig,
    TissueConfig,
)

Method = Literal["erm", "scaat", "advgrad", "sgt"]
METHOD_NAMES = ("erm", "scaat", "advgrad", "sgt")


class TrainConfig(Section):
    methods: list[Method] = Field(["erm", "scaat"], min_length=1, description="methods the workflow trains")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    class_names: tuple[str, ...] = Field(("normal", "lesion"), min_length=2)
    label_source: Literal["store", "slide"] = "store"
    balance_classes: bool = True
    ignore_band: tuple[float, float] | None = Field(
        None,
        description="patches whose lesion fraction f has low < f < high are left out of training "
        "(not of validation or evaluation); null: every patch",
    )
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_warmup_epochs: float = Field(0.0, ge=0, description="linear learning-rate warm-up")
    select_by: Literal["val_auroc", "val_accuracy", "val_loss", "last"] = Field(
        "val_auroc", description="epoch kept as best.pt: best validation metric, or the last epoch"
    )
    seed: int = 0
    num_workers: int = Field(0, ge=0, le=64)
    max_open_stores: int = Field(
        128, ge=1, le=65536,
        description="patch stores each data-loading process keeps open (least recently used closed first); "
        "keep it well below `ulimit -n`",
    )  # fmt: skip
    amp: bool | Literal["auto"] = Field(
        "auto",
        description="mixed precision (autocast; bf16 needs no loss scaling). auto: bfloat16 where the device "
        "computes it natively (CUDA with bf16, AVX512-BF16 or AMX CPUs), float16 with loss scaling on other "
        "CUDA devices, float32 on other CPUs; true: also bfloat16 on other CPUs (slow); false: float32 "
        "(on CPU, also where other jobs hold the cores: bf16 weight gradients spin-wait for threads)",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="model and batches in channels-last memory layout; auto: on CUDA and oneDNN CPUs"
    )
    deterministic: bool = Field(True, description="deterministic algorithms on CPU: same seed, same weights")
    gpus: int = Field(
        1, ge=1, le=64, description="processes (GPUs) per training job; > 1: the workflow runs torchrun (DDP)"
    )
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend under torchrun; auto: nccl on CUDA, gloo otherwise"
    )
    scaat: ScaatConfig = ScaatConfig()
    advgrad: AdvGradConfig = AdvGradConfig()
    sgt: SgtConfig = SgtConfig()

    runs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="named extra runs: {name: {method: M, <train keys to override>}}, e.g. a strength sweep",
    )

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each method at most once")
        return v

    @field_validator("ignore_band")
    @classmethod
    def _band(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError("must be [low, high] with 0 <= low < high <= 1")
        return v

    @model_validator(mode="after")
    def _valid_runs(self) -> TrainConfig:
        for name, spec in self.runs.items():
            self.run_settings(name, spec)
        return self

    def identity(self, method: str, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The settings that make a model of ``method`` trained with this section what it is, as JSON:
        not the list of methods and runs, nor other methods' knobs, nor the keys of ``exclude``, so that
        adding a run or changing SCAAT's knobs leaves the other models trained."""
        other_knobs = {key for key in ("scaat", "advgrad", "sgt") if key != method}
        return self.model_dump(mode="json", exclude={"methods", "runs", *other_knobs, *exclude})

    def run_settings(self, name: str, spec: dict[str, Any] | None = None) -> tuple[str, TrainConfig]:
        """The method and the train settings of the run ``name`` (a method name, or a key of ``runs``)."""
        if spec is None and name in METHOD_NAMES:
            return name, self
        spec = self.runs.get(name) if spec is None else spec
        if spec is None:
            raise ValueError(f"{name!r} is neither a method ({', '.join(METHOD_NAMES)}) nor a train.runs key")
        if not NAME_RE.match(name) or name in METHOD_NAMES or name == "pretrained":
            raise ValueError(f"run name {name!r}: letters, digits, '.', '_', '-' only, and not a method name")
        changes = dict(spec)
        method = changes.pop("method", None)
        seeds = changes.pop("seeds", 1)
        if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= 100:
            raise ValueError(f"run {name!r}: 'seeds' must be an integer from 1 to 100")
        if method not in METHOD_NAMES:
            raise ValueError(f"run {name!r}: 'method' must be one of {', '.join(METHOD_NAMES)}")
        if "runs" in changes or "methods" in changes:
            raise ValueError(f"run {name!r}: 'runs' and 'methods' cannot be overridden")
        base = self.model_dump(mode="json", exclude={"runs"})
        try:
            settings = TrainConfig.model_validate(deep_merge(base, changes))
        except ValidationError as err:
            raise ValueError(f"run {name!r}: {_format_errors(err)}") from None
        return method, settings


class Config(Section):
    """The whole workflow configuration."""

    cohort: CohortConfig
    results_dir: Path = Path("results")
    synth: SynthConfig | None = None
    tissue: TissueConfig = TissueConfig()
    tiling: TilingConfig = TilingConfig()
    train: TrainConfig = TrainConfig()
    model_checkpoint: Path | None = Field(
        None, description="a trained checkpoint: the workflow explains the cohort with it and trains nothing"
    )
    saliency: SaliencyConfig = SaliencyConfig()
    stitch: StitchConfig = StitchConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _overlap_fits_patch(self) -> Config:
        size = self.tiling.patch_size
        if self.saliency.overlap >= size:
            raise ValueError(
                f"saliency.overlap ({self.saliency.overlap} px) must be below tiling.patch_size ({size} px); "
                f"half the patch ({size // 2}) blends away the seams"
            )
        return self

    @property
    def runs(self) -> list[str]:
        """The training runs: the methods of train.methods and the train.runs entries, or 'pretrained'."""
        if self.model_checkpoint is not None:
            return ["pretrained"]
        return list(self.train.methods) + list(self.train.runs)

    def run_seeds(self, run: str) -> list[int]:
        """The training seeds of ``run``: train.seed and the next ones, as many as it asks for."""
        if run == "pretrained" and self.model_checkpoint is not None:
            return [self.train.seed]
        spec = self.train.runs.get(run, {})
        count = int(spec.get("seeds", self.evaluate.seeds))
        seed = int(spec.get("seed", self.train.seed))
        return list(range(seed, seed + count))

    def replicates(self, run: str) -> list[str]:
        """The model names of ``run``, one per seed: the run's name, then ``<run>.s<seed>``."""
        seeds = self.run_seeds(run)
        return [run] + [f"{run}.s{seed}" for seed in seeds[1:]]

    @property
    def models(self) -> list[str]:
        """Every model the workflow trains and evaluates: each run's replicates (or 'pretrained')."""
        return [model for run in self.runs for model in self.replicates(run)]

    def run_of(self, model: str) -> tuple[str, int]:
        """The run and training seed of the model ``model``."""
        for run in self.runs:
            for name, seed in zip(self.replicates(run), self.run_seeds(run), strict=True):
                if name == model:
                    return run, seed
        raise ConfigError("train", f"unknown model {model!r}; the config has {', '.join(self.models)}")

    def training_run(self, name: str) -> tuple[str, Config]:
        """The method of the model ``name`` and the config that trains it (runs and seeds override train)."""
        run, seed = self.run_of(name) if name in self.models else (name, None)
        try:
            method, settings = self.train.run_settings(run)
        except ValueError as exc:
            raise ConfigError("train", str(exc)) from None
        if seed is not None and seed != settings.seed:
            settings = settings.model_copy(update={"seed": seed})
        if settings is self.train:
            return method, self
        return method, self.model_copy(update={"train": settings})

    @property
    def results(self) -> Path:
        """Folder of this cohort's outputs."""
        return self.results_dir / self.cohort.name


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] != "extra_forbidden" and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def validate_config(data: dict[str, Any], source: str | Path | None = None) -> Config:
    """Validate a config mapping; raise ``ConfigError`` naming each bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source or "config", "invalid configuration: " + _format_errors(err)) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update, as Snakemake merges several ``--configfile`` files."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def override(cfg: Config, changes: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with nested ``changes`` applied, validated again."""
    return validate_config(deep_merge(cfg.model_dump(mode="json"), changes), source="overrides")


def ensure_config_file(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` to ``path`` unless the file already holds exactly that config; returns the path."""
    path = Path(path)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        from wsi_scaat.atomic import write_text

        write_text(path, text)
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, or ``ConfigError`` naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(path, f"cannot read YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "top level must be a mapping")
    return data


def load_config(*paths: str | Path) -> Config:
    """Load and validate one or more YAML files, later ones overriding earlier ones."""
    data: dict[str, Any] = {}
    for path in paths:
        data = deep_merge(data, read_yaml(path))
    return validate_config(data, source=", ".join(str(p) for p in paths))
