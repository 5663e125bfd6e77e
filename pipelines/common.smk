# Config validation and input helpers shared by the rule files.
import functools
import json
import os
import re
import shlex
import sys

from wsi_scaat.atomic import write_text
from wsi_scaat.config import ensure_config_file, validate_config
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.manifest import read_manifest

try:
    CFG = validate_config(config, source="snakemake config")
    for key, value in (("results_dir", CFG.results_dir), ("model_checkpoint", CFG.model_checkpoint)):
        if value is not None and re.search("[{}]", str(value)):  # Snakemake reads braces as wildcards
            raise WsiScaatError("snakemake config", f"{key}: braces are not allowed in the workflow's paths")
    SLIDES = {entry.slide_id: entry for entry in read_manifest(CFG.cohort.manifest)}
except WsiScaatError as err:
    sys.exit(f"wsi-scaat: error: {err}")

RESULTS = str(CFG.results)
# The validated config, complete with defaults: the --config of the stages that need one. Written
# when its content changes; the rules' params decide what re-runs.
RESOLVED_CONFIG = str(ensure_config_file(CFG, f"{RESULTS}/config.yaml"))
STORE_EXT = CFG.tiling.format
# Models trained here: the methods of train.methods and the named runs of train.runs, once per seed
# (evaluate.seeds; the first seed's model has the run's name, the others <run>.s<seed>).
TRAINED = [] if CFG.model_checkpoint is not None else CFG.models
# The package's CLI, run by the Python that runs Snakemake (no reliance on PATH).
WSI = f"{shlex.quote(sys.executable)} -m wsi_scaat"


# A slide id is any name without '/' (manifest.check_slide_id); the get_* helpers refuse one that
# is not in the manifest. Not an alternation of every slide id: Snakemake would embed that regex in
# every file pattern and match and substitute it per job, making the DAG quadratic in the slides.
wildcard_constraints:
    slide="[^/]+" if SLIDES else "(?!)",
    method="|".join(re.escape(m) for m in TRAINED) or "(?!)",
    model="|".join(re.escape(m) for m in CFG.models),


def store_output(path):
    """Output declaration of a patch store: zarr stores are folders."""
    return directory(path) if STORE_EXT == "zarr" else path


def get_parent(wildcards, output):
    """Folder of a rule's first output (where the CLI writes)."""
    return os.path.dirname(output[0])


def get_grandparent(wildcards, output):
    """Folder above the folder of a rule's first output."""
    return os.path.dirname(os.path.dirname(output[0]))


def slide_entry(wildcards):
    """The manifest row of a job's slide (the slide wildcard matches any name: an unknown one stops here)."""
    try:
        return SLIDES[wildcards.slide]
    except KeyError:
        raise WsiScaatError(CFG.cohort.manifest, f"no slide {wildcards.slide!r} in the manifest") from None


def get_slide_path(wildcards):
    """The slide file of a manifest row."""
    return str(slide_entry(wildcards).path)


def fixed_param(text):
    """A param that is the same for every job: the text itself (Snakemake fills wildcards in it, and
    a text is cheaper per job than a function), or a function returning it when it holds braces."""
    if "{" not in text and "}" not in text:
        return text

    def get_text(wildcards):
        return text

    return get_text


@functools.cache
def as_input(path):
    """``path`` as a rule input, or None when it cannot be one.

    Left out: a file that does not exist (the job then fails for that slide alone, with a one-line
    reason in its log, instead of Snakemake stopping the whole cohort), and a name holding
    ``{word}``, which Snakemake would read as a wildcard. Jobs get their files through params.
    Looked up once per file and Snakemake process (a slide's tile and export jobs share it).
    """
    path = str(path)
    return path if os.path.exists(path) and not re.search(r"\{\s*[.\w]+\s*[,}]", path) else None


def get_slide_input(wildcards):
    """The slide file as an input, when it can be one (see as_input)."""
    path = as_input(get_slide_path(wildcards))
    return [path] if path else []


def get_slide_inputs(wildcards):
    """The slide file and, when the manifest names one, its annotations (those that can be inputs)."""
    entry = slide_entry(wildcards)
    inputs = {"slide": as_input(entry.path)}
    if entry.annotations is not None:
        inputs["annotations"] = as_input(entry.annotations)
    return {key: path for key, path in inputs.items() if path}


def get_tile_args(wildcards):
    """Command-line flags of `wsi-scaat tile` for one slide, shell-quoted."""
    entry, t = slide_entry(wildcards), CFG.tiling
    args = [
        "--patch-size", t.patch_size, "--target-mpp", t.target_mpp, "--overlap", t.overlap,
        "--min-tissue", t.min_tissue, "--format", t.format, "--compression", t.compression,
        "--label-threshold", t.label_threshold, "--region-size", t.region_size,
        "--thumbnail-mpp", CFG.tissue.thumbnail_mpp, "--tissue-min-area-um2", CFG.tissue.min_area_um2,
        "--tissue-min-saturation", CFG.tissue.min_saturation, "--tissue-closing-um", CFG.tissue.closing_um,
        "--tissue-max-hole-um2", CFG.tissue.max_hole_um2, "--annotation-class", t.annotation_class,
    ]
    if entry.annotations is not None:
        args += ["--annotations", entry.annotations]
    if entry.mpp is not None:
        args += ["--mpp-override", entry.mpp]
    return " ".join(shlex.quote(str(a)) for a in args)


def get_config_json(wildcards=None, section=None):
    """The validated config (or one section) as JSON: a param, so a change re-runs the rule."""
    data = CFG.model_dump(mode="json")
    return json.dumps(data if section is None else data[section], sort_keys=True)


def get_train_json(wildcards):
    """The train settings of one model (a method or a train.runs entry) as JSON: a param of the train
    rule (a change re-trains), without what changes no result of this model (the number of open stores,
    the other runs and the other methods' knobs)."""
    method, cfg = CFG.training_run(wildcards.method)
    return json.dumps(cfg.train.identity(method, frozenset({"max_open_stores"})), sort_keys=True)


TRAIN_STORES = f"{RESULTS}/models/train_stores.txt"


def write_store_list(path, stores):
    """The list of the training stores (``TRAIN_STORES``): one a line, relative to the results folder."""
    write_text(path, "".join(f"{os.path.relpath(store, RESULTS)}\n" for store in stores))


def get_train_stores(wildcards):
    """Patch stores of the slides the models learn from (splits train and val)."""
    return [
        f"{RESULTS}/tiles/{sid}.{STORE_EXT}"
        for sid, entry in sorted(SLIDES.items())
        if entry.split in ("train", "val")
    ]


# GPUs a training or inference job asks for: one when the config requests CUDA; a training job
# train.gpus when it asks for several (one torchrun process each).
GPUS = 1 if CFG.train.device == "cuda" else 0
TRAIN_GPUS = CFG.train.gpus if CFG.train.gpus > 1 else GPUS


def get_train_launcher(wildcards=None):
    """The command that runs `wsi-scaat train`: under torchrun (DDP) when train.gpus > 1."""
    if CFG.train.gpus == 1:
        return WSI
    torchrun = f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone"
    return f"{torchrun} --nproc_per_node {CFG.train.gpus} -m wsi_scaat"


# The checkpoint that explains the cohort: the configured one (no braces, checked above), or the
# model trained here (a pattern of the rule's `model` wildcard).
CHECKPOINT = f"{RESULTS}/models/{{model}}/best.pt" if CFG.model_checkpoint is None else str(CFG.model_checkpoint)


def saliency_args():
    """Flags of `wsi-scaat saliency` from the config, shell-quoted."""
    s = CFG.saliency
    args = ["--method", s.method, "--target", s.target, "--map-downsample", s.map_downsample,
            "--batch-size", s.batch_size, "--device", s.device, "--overlap", s.overlap,
            "--amp", str(s.amp).lower()]
    for key, value in sorted(s.options.items()):
        args += ["--option", f"{key}={value}"]
    return " ".join(shlex.quote(str(a)) for a in args)


def stitch_args():
    """Flags of `wsi-scaat stitch` from the config, shell-quoted."""
    s = CFG.stitch
    args = ["--value", s.value, "--chunk", s.chunk, "--window", s.window, "--low-percentile", s.low_percentile,
            "--high-percentile", s.high_percentile, "--mask-tissue" if s.mask_tissue else "--no-mask-tissue"]
    if s.scheduler:
        args += ["--scheduler", s.scheduler]
    return " ".join(shlex.quote(str(a)) for a in args)


SALIENCY_ARGS = fixed_param(saliency_args())
STITCH_ARGS = fixed_param(stitch_args())


def get_export_args(wildcards):
    """Flags of `wsi-scaat export` from the config and the manifest, shell-quoted."""
    e = CFG.export
    args = ["--slide", slide_entry(wildcards).path, "--colormap", e.colormap,
            "--overlay-alpha", e.overlay_alpha, "--region-threshold", e.region_threshold,
            "--min-region-area-um2", e.min_region_area_um2, "--thumbnail-size", e.thumbnail_size,
            "--tile-size", e.tile_size, "--region-smooth-um", e.region_smooth_um,
            "--overlay-low", e.overlay_low, "--overlay-high", e.overlay_high,
            "--display-smooth-um", e.display_smooth_um]
    annotations = SLIDES[wildcards.slide].annotations
    if annotations is not None:
        args += ["--annotations", annotations, "--annotation-class", CFG.tiling.annotation_class]
    return " ".join(shlex.quote(str(a)) for a in args)


EVAL_SLIDES = sorted(sid for sid, entry in SLIDES.items() if entry.split in CFG.evaluate.splits)


def get_eval_stores(wildcards):
    """Patch stores of the held-out slides (evaluate.splits)."""
    return [f"{RESULTS}/tiles/{sid}.{STORE_EXT}" for sid in EVAL_SLIDES]


def get_eval_saliency(wildcards):
    """Saliency stores of one model on the held-out slides."""
    return [f"{RESULTS}/saliency/{wildcards['model']}/{sid}.saliency.zarr" for sid in EVAL_SLIDES]


def get_eval_heatmaps(wildcards):
    """Heatmap pyramids of one model on the held-out slides."""
    return [f"{RESULTS}/heatmaps/{wildcards['model']}/{sid}.heatmap.zarr" for sid in EVAL_SLIDES]


def get_evaluate_json(wildcards):
    """Settings an evaluation depends on (a param: a change re-runs it)."""
    data = CFG.model_dump(mode="json")
    return json.dumps({k: data[k] for k in ("evaluate", "saliency", "stitch")}, sort_keys=True)


EXPORTS = {
    "tiles": "tiles.geojson",
    "regions": "regions.geojson",
    "overlay": "overlay.png",
    "heatmap_png": "heatmap.png",
    "thumbnail": "thumbnail.png",
    "figure": "figure.png",
    "ome_tiff": "heatmap.ome.tif",
    "ome_tiff_rgb": "heatmap_rgb.ome.tif",
}


def get_final_outputs():
    """Every final output of the workflow: stores, models (unless given), exports per model and slide.

    One file per job: a job makes all its outputs, and Snakemake looks up the producer of every
    requested file (most lookups of this rule were repeats). The patch store of an explained slide
    comes with its exports; the others are asked for by name.
    """
    explained = sorted(s for s, e in SLIDES.items() if CFG.saliency.splits is None or e.split in CFG.saliency.splits)
    tiled_only = sorted(set(SLIDES) - set(explained))
    outputs = expand(f"{RESULTS}/tiles/{{slide}}.{STORE_EXT}", slide=tiled_only)
    if CFG.model_checkpoint is None:
        outputs += expand(f"{RESULTS}/models/{{method}}/best.pt", method=TRAINED)
    # Review exports for each run's first-seed model; the other seeds are for the evaluation only.
    outputs += expand(f"{RESULTS}/export/{{model}}/{{slide}}.overlay.png", model=CFG.runs, slide=explained)
    if EVAL_SLIDES:
        outputs.append(f"{RESULTS}/evaluation/metrics.csv")
    return outputs
