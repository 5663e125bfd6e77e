"""The ``wsi-scaat`` command. Each subcommand is a thin shell over a package function.

Errors from bad input print one line, ``wsi-scaat: error: <file>: <cause>``, and exit 1.
Set ``WSI_SCAAT_DEBUG=1`` for full tracebacks.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_scaat import __version__
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.sections import (
    ExportConfig,
    SaliencyConfig,
    StitchConfig,
    SynthConfig,
    TilingConfig,
    TissueConfig,
)
from wsi_scaat.sections import field_default as _d
from wsi_scaat.sections import field_help as _h

app = typer.Typer(
    name="wsi-scaat",
    help="Whole-slide pipeline: tile, train (SCAAT and baselines), saliency, stitch, export, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    typer.echo(f"wsi-scaat: error: {' '.join(message.split())}", err=True)  # one line, always
    raise typer.Exit(1)


def one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one line on stderr and exit status 1 (tracebacks with WSI_SCAAT_DEBUG=1)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("WSI_SCAAT_DEBUG"):
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except WsiScaatError as exc:
            _fail(str(exc))
        except (OSError, ValueError, MemoryError) as exc:
            where = getattr(exc, "filename", None)
            _fail(f"{where}: {exc.strerror or exc}" if where and isinstance(exc, OSError) else str(exc))
        except Exception as exc:  # unexpected: still one line, with the type to search for
            _fail(f"unexpected {type(exc).__name__}: {exc} (set WSI_SCAAT_DEBUG=1 for the traceback)")

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Whole-slide pipeline for saliency-constrained adaptive adversarial training (SCAAT)."""


class StoreFormat(str, Enum):
    h5 = "h5"
    zarr = "zarr"


class Difficulty(str, Enum):
    easy = "easy"
    hard = "hard"


class Compression(str, Enum):
    lz4 = "lz4"
    zstd = "zstd"
    gzip = "gzip"
    none = "none"


class Switch(str, Enum):
    """A config field ``bool | "auto"`` on the command line."""

    auto = "auto"
    true = "true"
    false = "false"

    @classmethod
    def of(cls, value: bool | str) -> Switch:
        return cls(str(value).lower())

    def resolve(self) -> bool | str:
        return {"auto": "auto", "true": True, "false": False}[self.value]


@app.command()
@one_line_errors
def synth(
    out: Annotated[Path | None, typer.Option(help=_h(SynthConfig, "out"))] = None,
    slides: Annotated[int, typer.Option(min=1, help=_h(SynthConfig, "slides"))] = _d(SynthConfig, "slides"),
    width: Annotated[int, typer.Option(min=256, help=_h(SynthConfig, "width"))] = _d(SynthConfig, "width"),
    height: Annotated[int, typer.Option(min=256, help=_h(SynthConfig, "height"))] = _d(SynthConfig, "height"),
    seed: Annotated[int, typer.Option(help=_h(SynthConfig, "seed"))] = _d(SynthConfig, "seed"),
    mpp: Annotated[float, typer.Option(min=0.01, help=_h(SynthConfig, "mpp"))] = _d(SynthConfig, "mpp"),
    lesion_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help=_h(SynthConfig, "lesion_slide_fraction"))
    ] = _d(SynthConfig, "lesion_slide_fraction"),
    difficulty: Annotated[Difficulty, typer.Option(help=_h(SynthConfig, "difficulty"))] = Difficulty(
        _d(SynthConfig, "difficulty")
    ),
    split_fractions: Annotated[
        tuple[float, float, float], typer.Option(min=0.0, help=_h(SynthConfig, "split_fractions"))
    ] = _d(SynthConfig, "split_fractions"),
    config: Annotated[
        list[Path] | None,
        typer.Option(help="Take every setting from the config's `synth:` section instead (repeatable)."),
    ] = None,
) -> None:
    """Generate a synthetic H&E cohort with ground-truth lesion annotations and a manifest.

    With --config, nothing is regenerated when the cohort folder already holds a cohort made
    with the same settings.
    """
    from wsi_scaat.synth import ensure_cohort

    if config:
        from wsi_scaat.config import load_config

        cfg = load_config(*config)
        if cfg.synth is None:
            raise ValueError(f"{', '.join(map(str, config))}: no `synth:` section")
        s = cfg.synth
        out, slides, width, height, seed, mpp, lesion_fraction = (
            s.out,
            s.slides,
            s.width,
            s.height,
            s.seed,
            s.mpp,
            s.lesion_slide_fraction,
        )
        difficulty, split_fractions = Difficulty(s.difficulty), s.split_fractions
    if out is None:
        raise ValueError("give --out DIR (or --config FILE with a `synth:` section)")
    manifest, made = ensure_cohort(
        out,
        slides,
        width,
        height,
        seed,
        mpp=mpp,
        lesion_slide_fraction=lesion_fraction,
        difficulty=difficulty.value,
        split_fractions=tuple(split_fractions),
    )
    verb = "wrote" if made else "up to date:"
    typer.echo(f"{verb} {slides} slides of {width} x {height} px; manifest: {manifest}")


@app.command()
@one_line_errors
def tile(
    slide: Annotated[Path, typer.Argument(help="Whole-slide image (SVS, NDPI, MRXS, TIFF, OME-TIFF...).")],
    out: Annotated[Path, typer.Option(help="Output folder for the store and tissue mask.")],
    patch_size: Annotated[int, typer.Option(min=8, help=_h(TilingConfig, "patch_size"))] = _d(
        TilingConfig, "patch_size"
    ),
    target_mpp: Annotated[float, typer.Option(min=0.01, help=_h(TilingConfig, "target_mpp"))] = _d(
        TilingConfig, "target_mpp"
    ),
    overlap: Annotated[int, typer.Option(min=0, help=_h(TilingConfig, "overlap"))] = _d(
        TilingConfig, "overlap"
    ),
    min_tissue: Annotated[float, typer.Option(min=0.0, max=1.0, help=_h(TilingConfig, "min_tissue"))] = _d(
        TilingConfig, "min_tissue"
    ),
    format: Annotated[StoreFormat, typer.Option(help=_h(TilingConfig, "format"))] = StoreFormat(
        _d(TilingConfig, "format")
    ),
    annotations: Annotated[
        Path | None, typer.Option(help="QuPath GeoJSON of lesions: adds lesion_fraction and labels.")
    ] = None,
    mpp_override: Annotated[
        float | None, typer.Option(min=0.001, help="Level-0 microns per pixel, replacing the metadata.")
    ] = None,
    slide_id: Annotated[
        str | None, typer.Option(help="Slide id (default: the file name without extension; x.ome.tif -> x).")
    ] = None,
    compression: Annotated[Compression, typer.Option(help=_h(TilingConfig, "compression"))] = Compression(
        _d(TilingConfig, "compression")
    ),
    thumbnail_mpp: Annotated[float, typer.Option(min=0.1, help=_h(TissueConfig, "thumbnail_mpp"))] = _d(
        TissueConfig, "thumbnail_mpp"
    ),
    tissue_min_area_um2: Annotated[float, typer.Option(min=0.0, help=_h(TissueConfig, "min_area_um2"))] = _d(
        TissueConfig, "min_area_um2"
    ),
    tissue_min_saturation: Annotated[
        float, typer.Option(min=0.0, max=1.0, help=_h(TissueConfig, "min_saturation"))
    ] = _d(TissueConfig, "min_saturation"),
    tissue_closing_um: Annotated[float, typer.Option(min=0.0, help=_h(TissueConfig, "closing_um"))] = _d(
        TissueConfig, "closing_um"
    ),
    tissue_max_hole_um2: Annotated[float, typer.Option(min=0.0, help=_h(TissueConfig, "max_hole_um2"))] = _d(
        TissueConfig, "max_hole_um2"
    ),
    label_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help=_h(TilingConfig, "label_threshold"))
    ] = _d(TilingConfig, "label_threshold"),
    annotation_class: Annotated[str, typer.Option(help=_h(TilingConfig, "annotation_class"))] = _d(
        TilingConfig, "annotation_class"
    ),
    workers: Annotated[int, typer.Option(min=0, help="Reader threads (0: all available cores).")] = 0,
    region_size: Annotated[int, typer.Option(min=256, help=_h(TilingConfig, "region_size"))] = _d(
        TilingConfig, "region_size"
    ),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Detect tissue and cut the slide into a patch store (<out>/<slide_id>.h5 or .zarr)."""
    from wsi_scaat.manifest import check_slide_id
    from wsi_scaat.slides.tiling import TileParams, tile_slide

    if overlap >= patch_size:
        raise ValueError(f"--overlap ({overlap}) must be smaller than --patch-size ({patch_size})")
    params = TileParams(
        patch_size=patch_size,
        target_mpp=target_mpp,
        overlap=overlap,
        min_tissue=min_tissue,
        format=format.value,
        compression=compression.value,
        thumbnail_mpp=thumbnail_mpp,
        label_threshold=label_threshold,
        annotation_class=annotation_class,
        workers=workers,
        region_size=region_size,
        tissue=TissueConfig(
            thumbnail_mpp=thumbnail_mpp,
            min_area_um2=tissue_min_area_um2,
            min_saturation=tissue_min_saturation,
            closing_um=tissue_closing_um,
            max_hole_um2=tissue_max_hole_um2,
        ),
    )
    sid = check_slide_id(slide_id) if slide_id else None
    store = tile_slide(
        slide,
        out,
        params,
        slide_id=sid,
        annotations=annotations,
        mpp_override=mpp_override,
        progress=progress,
    )
    from wsi_scaat.store import open_store

    with open_store(store) as s:
        typer.echo(f"{store}: {len(s)} patches of {patch_size} px at {s.attrs['patch_mpp']:.3f} mpp")


@app.command()
@one_line_errors
def train(
    config: Annotated[list[Path], typer.Option(help="Config file(s), later ones overriding earlier ones.")],
    method: Annotated[
        str, typer.Option(help="Method (erm, scaat, advgrad, sgt) or the name of a train.runs entry.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <results>/<cohort>/models/<method>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from <out>/last.pt if made with these settings.")
    ] = False,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override train.epochs.")] = None,
    device: Annotated[str | None, typer.Option(help="Override train.device (auto, cpu, cuda).")] = None,
    progress: Annotated[bool | None, typer.Option(help="Progress bars (default: on a terminal).")] = None,
) -> None:
    """Train a patch classifier with one method; writes last.pt, best.pt, metrics.csv, curves.png."""
    from wsi_scaat.config import load_config, override
    from wsi_scaat.training.trainer import fit

    cfg = load_config(*config)
    changes = {k: v for k, v in {"epochs": epochs, "device": device}.items() if v is not None}
    if changes:
        cfg = override(cfg, {"train": changes})
    name = method
    method, cfg = cfg.training_run(name)
    out = out or cfg.results / "models" / name
    summary = fit(cfg, method, out, resume=resume, log=typer.echo, show_progress=progress)
    best = summary["history"][summary["best_epoch"] - 1] if summary["history"] else None
    if best and summary.get("rank", 0) == 0:  # under torchrun, rank 0 alone reports
        typer.echo(
            f"{name}: best epoch {best['epoch']}, val accuracy {best['val_accuracy']:.3f}, "
            f"val AUROC {best['val_auroc']:.3f}; checkpoints in {out}"
        )


def _options(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs as a dict, values parsed as int, float or kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


@app.command()
@one_line_errors
def saliency(
    checkpoint: Annotated[Path, typer.Option(help="Trained checkpoint (best.pt).")],
    store: Annotated[Path, typer.Option(help="Patch store of one slide (.h5 or .zarr).")],
    out: Annotated[Path, typer.Option(help="Output folder for <slide_id>.saliency.zarr.")],
    method: Annotated[str, typer.Option(help=_h(SaliencyConfig, "method"))] = _d(SaliencyConfig, "method"),
    target: Annotated[str, typer.Option(help=_h(SaliencyConfig, "target"))] = _d(SaliencyConfig, "target"),
    map_downsample: Annotated[int, typer.Option(min=1, help=_h(SaliencyConfig, "map_downsample"))] = _d(
        SaliencyConfig, "map_downsample"
    ),
    batch_size: Annotated[int, typer.Option(min=1, help=_h(SaliencyConfig, "batch_size"))] = _d(
        SaliencyConfig, "batch_size"
    ),
    device: Annotated[str, typer.Option(help=_h(SaliencyConfig, "device"))] = _d(SaliencyConfig, "device"),
    overlap: Annotated[int, typer.Option(min=0, help=_h(SaliencyConfig, "overlap"))] = _d(
        SaliencyConfig, "overlap"
    ),
    amp: Annotated[Switch, typer.Option(help=_h(SaliencyConfig, "amp"))] = Switch.of(
        _d(SaliencyConfig, "amp")
    ),
    option: Annotated[
        list[str] | None, typer.Option(help="Method keyword argument key=value (repeatable).")
    ] = None,
    progress: Annotated[bool | None, typer.Option(help="Progress bar (default: on a terminal).")] = None,
) -> None:
    """Class probabilities and saliency maps of every patch of a store."""
    from wsi_scaat.saliency.stage import run_saliency

    path = run_saliency(
        checkpoint,
        store,
        out,
        method=method,
        target=target,
        map_downsample=map_downsample,
        batch_size=batch_size,
        device=device,
        amp=amp.resolve(),
        options=_options(option),
        progress=progress,
        overlap=overlap,
    )
    typer.echo(f"wrote {path}")


@app.command()
@one_line_errors
def stitch(
    saliency_store: Annotated[Path, typer.Argument(help="A <slide_id>.saliency.zarr store.")],
    out: Annotated[Path, typer.Option(help="The <slide_id>.heatmap.zarr pyramid to write.")],
    value: Annotated[str, typer.Option(help=_h(StitchConfig, "value"))] = _d(StitchConfig, "value"),
    chunk: Annotated[int, typer.Option(min=64, help=_h(StitchConfig, "chunk"))] = _d(StitchConfig, "chunk"),
    window: Annotated[str, typer.Option(help=_h(StitchConfig, "window"))] = _d(StitchConfig, "window"),
    low_percentile: Annotated[
        float, typer.Option(min=0, max=100, help=_h(StitchConfig, "low_percentile"))
    ] = _d(StitchConfig, "low_percentile"),
    high_percentile: Annotated[
        float, typer.Option(min=0, max=100, help=_h(StitchConfig, "high_percentile"))
    ] = _d(StitchConfig, "high_percentile"),
    mask_tissue: Annotated[bool, typer.Option(help=_h(StitchConfig, "mask_tissue"))] = _d(
        StitchConfig, "mask_tissue"
    ),
    scheduler: Annotated[str | None, typer.Option(help=_h(StitchConfig, "scheduler"))] = _d(
        StitchConfig, "scheduler"
    ),
    progress: Annotated[bool, typer.Option(help="Show dask's progress bar.")] = False,
) -> None:
    """Stitch patch saliency maps into a slide heatmap pyramid (zarr), out of core with dask."""
    from wsi_scaat.heatmaps.stitching import stitch as run_stitch

    path = run_stitch(
        saliency_store,
        out,
        chunk=chunk,
        window=window,
        low_percentile=low_percentile,
        high_percentile=high_percentile,
        mask_tissue=mask_tissue,
        scheduler=scheduler,
        progress=progress,
        value=value,
    )
    typer.echo(f"wrote {path}")


@app.command()
@one_line_errors
def export(
    heatmap: Annotated[Path, typer.Argument(help="A <slide_id>.heatmap.zarr pyramid.")],
    saliency_store: Annotated[Path, typer.Option("--saliency", help="The slide's saliency store.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    slide: Annotated[
        Path | None, typer.Option(help="The slide (default: the path recorded in the store).")
    ] = None,
    colormap: Annotated[str, typer.Option(help=_h(ExportConfig, "colormap"))] = _d(ExportConfig, "colormap"),
    overlay_alpha: Annotated[float, typer.Option(min=0, max=1, help=_h(ExportConfig, "overlay_alpha"))] = _d(
        ExportConfig, "overlay_alpha"
    ),
    region_threshold: Annotated[
        float, typer.Option(min=0, max=1, help=_h(ExportConfig, "region_threshold"))
    ] = _d(ExportConfig, "region_threshold"),
    min_region_area_um2: Annotated[
        float, typer.Option(min=0, help=_h(ExportConfig, "min_region_area_um2"))
    ] = _d(ExportConfig, "min_region_area_um2"),
    thumbnail_size: Annotated[int, typer.Option(min=64, help=_h(ExportConfig, "thumbnail_size"))] = _d(
        ExportConfig, "thumbnail_size"
    ),
    tile_size: Annotated[int, typer.Option(min=64, help=_h(ExportConfig, "tile_size"))] = _d(
        ExportConfig, "tile_size"
    ),
    region_smooth_um: Annotated[float, typer.Option(min=0, help=_h(ExportConfig, "region_smooth_um"))] = _d(
        ExportConfig, "region_smooth_um"
    ),
    overlay_low: Annotated[float, typer.Option(min=0, max=1, help=_h(ExportConfig, "overlay_low"))] = _d(
        ExportConfig, "overlay_low"
    ),
    overlay_high: Annotated[float, typer.Option(min=0, max=1, help=_h(ExportConfig, "overlay_high"))] = _d(
        ExportConfig, "overlay_high"
    ),
    display_smooth_um: Annotated[float, typer.Option(min=0, help=_h(ExportConfig, "display_smooth_um"))] = _d(
        ExportConfig, "display_smooth_um"
    ),
    annotations: Annotated[
        Path | None, typer.Option(help="The slide's GeoJSON annotations, outlined in the figure.")
    ] = None,
    annotation_class: Annotated[
        str, typer.Option(help="Classification of the annotations outlined ('' for all).")
    ] = "lesion",
) -> None:
    """OME-TIFF heatmaps, PNG thumbnails/overlay/figure and QuPath GeoJSON (tiles, regions)."""
    from wsi_scaat.heatmaps.export import export_slide

    paths = export_slide(
        heatmap,
        saliency_store,
        out,
        slide_path=slide,
        colormap=colormap,
        overlay_alpha=overlay_alpha,
        region_threshold=region_threshold,
        min_region_area_um2=min_region_area_um2,
        thumbnail_size=thumbnail_size,
        tile_size=tile_size,
        region_smooth_um=region_smooth_um,
        overlay_low=overlay_low,
        overlay_high=overlay_high,
        display_smooth_um=display_smooth_um,
        annotations=annotations,
        annotation_class=annotation_class or None,
    )
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


@app.command()
@one_line_errors
def evaluate(
    config: Annotated[list[Path], typer.Option(help="The workflow's config file(s).")],
    model: Annotated[
        list[str] | None, typer.Option(help="Model(s) to evaluate (default: every model of the config).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <results>/<cohort>/evaluation).")
    ] = None,
    report: Annotated[
        bool, typer.Option(help="Write metrics.csv, metrics.md and the figures of all the config's models.")
    ] = True,
    skip_models: Annotated[
        bool, typer.Option("--report-only", help="Only assemble the report from evaluations already made.")
    ] = False,
) -> None:
    """Evaluate trained models on the held-out slides: accuracy, AUROC, complexity, faithfulness and
    localisation of their saliency maps; writes models/<model>.json, metrics.csv, metrics.md, figures."""
    from wsi_scaat.config import load_config
    from wsi_scaat.evaluation import evaluate_model
    from wsi_scaat.evaluation.report import write_report

    cfg = load_config(*config)
    out = out or cfg.results / "evaluation"
    if not skip_models:
        for name in model or cfg.models:
            if name not in cfg.models:
                raise ValueError(f"unknown model {name!r}; the config has {', '.join(cfg.models)}")
            s = evaluate_model(cfg, name, out, log=typer.echo)
            auc = "n/a" if s["heatmap_auroc"] is None else f"{s['heatmap_auroc']:.3f}"
            typer.echo(f"{name}: accuracy {s['accuracy']:.3f}, Gini {s['gini']:.3f}, heatmap AUROC {auc}")
    if report and (skip_models or not model):
        for kind, path in write_report(cfg, out, cfg.models).items():
            typer.echo(f"{kind}: {path}")


@app.command("masks-to-geojson")
@one_line_errors
def masks_to_geojson(
    mask: Annotated[
        Path, typer.Argument(help="Label image: palette or single-channel PNG/TIFF, one value per pixel.")
    ],
    out: Annotated[Path, typer.Option(help="GeoJSON file to write (QuPath annotations).")],
    classes: Annotated[
        str, typer.Option(help="Label values and class names, e.g. 0=tumour,1=stroma,2=normal.")
    ],
    ignore: Annotated[
        list[str] | None, typer.Option(help="Label values to leave out, e.g. background (repeatable or 3,4).")
    ] = None,
    downsample: Annotated[float, typer.Option(help="Level-0 slide pixels per mask pixel.")] = 1.0,
) -> None:
    """Turn a label image into QuPath annotations: one feature per connected region, in level-0 pixels."""
    from wsi_scaat.annotations_from_masks import masks_to_geojson as convert
    from wsi_scaat.annotations_from_masks import parse_classes, parse_values

    counts = convert(mask, out, parse_classes(classes), parse_values(ignore), downsample)
    regions = ", ".join(f"{name} {n}" for name, n in counts.items())
    typer.echo(f"{out}: {sum(counts.values())} regions ({regions})")


@app.command("manifest-from-masks")
@one_line_errors
def manifest_from_masks(
    images: Annotated[Path, typer.Argument(help="Folder of images (PNG, JPEG, TIFF), one slide each.")],
    masks: Annotated[Path, typer.Argument(help="Folder of label images with the images' file names.")],
    out: Annotated[Path, typer.Option(help="Cohort folder: manifest.csv and annotations/<id>.geojson.")],
    classes: Annotated[
        str, typer.Option(help="Label values and class names, e.g. 0=tumour,1=stroma,2=normal.")
    ],
    positive: Annotated[str, typer.Option(help="Class that makes an image's slide label 1.")],
    mpp: Annotated[float, typer.Option(help="Level-0 microns per pixel of the images.")],
    ignore: Annotated[
        list[str] | None, typer.Option(help="Label values to leave out, e.g. background (repeatable or 3,4).")
    ] = None,
    test: Annotated[int, typer.Option(min=0, help="Images held out for testing.")] = 20,
    val: Annotated[int, typer.Option(min=0, help="Images for validation (checkpoint selection).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the split (stratified by slide label).")] = 0,
    downsample: Annotated[float, typer.Option(help="Level-0 image pixels per mask pixel.")] = 1.0,
) -> None:
    """Build a cohort from images with label masks: annotations, a seeded split by image, the manifest.

    Files are rewritten only when their content changes.
    """
    from wsi_scaat.annotations_from_masks import parse_classes, parse_values
    from wsi_scaat.mask_cohort import build_mask_cohort

    manifest, counts = build_mask_cohort(
        images, masks, out, parse_classes(classes), positive=positive, mpp=mpp, ignore=parse_values(ignore),
        test=test, val=val, seed=seed, downsample=downsample,
    )  # fmt: skip
    split = ", ".join(f"{n} {name}" for name, n in counts.items())
    typer.echo(f"{manifest}: {sum(counts.values())} images ({split})")


@app.command("resolve-config")
@one_line_errors
def resolve_config(
    out: Annotated[Path, typer.Option(help="YAML file to write.")],
    config: Annotated[list[Path] | None, typer.Option(help="Config file(s) to merge and validate.")] = None,
    json_text: Annotated[str | None, typer.Option("--json", help="The config as a JSON string.")] = None,
) -> None:
    """Validate a configuration and write it, complete with defaults, as one YAML file."""
    import json

    from wsi_scaat.config import ensure_config_file, load_config, validate_config

    if (config is None) == (json_text is None):
        raise ValueError("give either --config FILE(s) or --json TEXT")
    cfg = load_config(*config) if config else validate_config(json.loads(json_text), source="--json")
    ensure_config_file(cfg, out)
    typer.echo(f"wrote {out}")


@app.command("check-config")
@one_line_errors
def check_config(
    files: Annotated[list[Path], typer.Argument(help="YAML files, later ones overriding earlier ones.")],
) -> None:
    """Validate configuration files; exit 1 naming the first bad key."""
    from wsi_scaat.config import load_config

    cfg = load_config(*files)
    typer.echo(f"ok: cohort {cfg.cohort.name!r}, outputs under {cfg.results}")


@app.command()
@one_line_errors
def info(
    path: Annotated[Path, typer.Argument(help="A slide or a patch store.")],
    mpp_override: Annotated[float | None, typer.Option(help="Level-0 microns per pixel.")] = None,
) -> None:
    """Print the metadata of a slide or a patch store as one JSON line."""
    import json

    if path.suffix in (".h5", ".zarr"):
        from wsi_scaat.store import open_store

        with open_store(path) as store:
            typer.echo(store.describe())
        return
    from dataclasses import asdict

    from wsi_scaat.slides import open_slide

    with open_slide(path, mpp_override) as reader:
        typer.echo(json.dumps(asdict(reader.info)))


@app.command()
@one_line_errors
def outputs(
    config: Annotated[list[Path], typer.Option(help="The workflow's config file(s).")],
) -> None:
    """Print where a workflow run's outputs are, stage by stage."""
    from wsi_scaat.config import load_config

    cfg = load_config(*config)
    root = cfg.results
    if not root.exists():
        raise ValueError(f"{root}: no outputs yet (run snakemake first)")
    typer.echo(f"outputs of cohort {cfg.cohort.name!r} under {root}/")
    for stage in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("logs", "benchmarks")):
        folders = [stage] + sorted(p for p in stage.iterdir() if p.is_dir() and not p.suffix)
        for folder in folders:
            files = sorted(
                f for f in folder.iterdir() if not f.name.startswith(".") and (f.is_file() or f.suffix)
            )
            if files:
                kinds = sorted({".".join(f.name.split(".")[1:]) or "(no suffix)" for f in files})
                typer.echo(f"  {folder}/  {len(files)} files ({', '.join(kinds)})")
    typer.echo(f"  logs: {root / 'logs'}/<stage>/...")
    models = sorted((root / "models").glob("*/best.pt"))
    if models:
        from wsi_scaat.training.checkpoint import load_checkpoint

        typer.echo("models (validation metrics of best.pt):")
        for path in models:
            state = load_checkpoint(path)
            row, total = state["history"][state["epoch"] - 1], state["config"]["train"]["epochs"]
            typer.echo(
                f"  {path.parent.name:8s} val accuracy {row['val_accuracy']:.3f}  val AUROC "
                f"{row['val_auroc']:.3f}  (epoch {state['epoch']} of {total})  {path}"
            )
    table = root / "evaluation" / "metrics.md"
    if table.is_file():
        typer.echo(f"evaluation on the held-out slides ({table}):")
        typer.echo(table.read_text(encoding="utf-8").split("\n\n")[0])


@app.command()
@one_line_errors
def summarize(
    config: Annotated[list[Path], typer.Option(help="The workflow's config file(s).")],
) -> None:
    """Write <results>/<cohort>/run_summary.csv: each slide's status, failing stage and one-line reason."""
    from wsi_scaat.config import load_config
    from wsi_scaat.manifest import read_manifest
    from wsi_scaat.run_summary import describe, problem_lines, write_summary

    cfg = load_config(*config)
    path, rows = write_summary(cfg, read_manifest(cfg.cohort.manifest))
    typer.echo(describe(path, rows))
    for line in problem_lines(rows):
        typer.echo(line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
