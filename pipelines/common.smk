# Config validation and input helpers shared by the rule files.
import json
import os
import re
import shlex
import sys

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
# Models trained here: the methods of train.methods and the named runs of train.runs.
TRAINED = [] if CFG.model_checkpoint is not None else CFG.models
# The package's CLI, run by the Python that runs Snakemake (no reliance on PATH).
WSI = f"{shlex.quote(sys.executable)} -m wsi_scaat"


wildcard_constraints:
    slide="|".join(re.escape(s) for s in SLIDES) or "(?!)",
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


def get_slide_path(wildcards):
    """The slide file of a manifest row."""
    return str(SLIDES[wildcards.slide].path)


def as_input(path):
    """``path`` as a rule input, or None when it cannot be one.

    Left out: a file that does not exist (the job then fails for that slide alone, with a one-line
    reason in its log, instead of Snakemake stopping the whole cohort), and a name holding
    ``{word}``, which Snakemake would read as a wildcard. Jobs get their files through params.
    """
    path = str(path)
    return path if os.path.exists(path) and not re.search(r"\{\s*[.\w]+\s*[,}]", path) else None


def get_slide_input(wildcards):
    """The slide file as an input, when it can be one (see as_input)."""
    path = as_input(get_slide_path(wildcards))
    return [path] if path else []


def get_slide_inputs(wildcards):
    """The slide file and, when the manifest names one, its annotations (those that can be inputs)."""
    entry = SLIDES[wildcards.slide]
    inputs = {"slide": as_input(entry.path)}
    if entry.annotations is not None:
        inputs["annotations"] = as_input(entry.annotations)
    return {key: path for key, path in inputs.items() if path}


def get_tile_args(wildcards):
    """Command-line flags of `wsi-scaat tile` for one slide, shell-quoted."""
    entry, t = SLIDES[wildcards.slide], CFG.tiling
    args = [
        "--patch-size", t.patch_size, "--target-mpp", t.target_mpp, "--overlap", t.overlap,
        "--min-tissue", t.min_tissue, "--format", t.format, "--compression", t.compression,
        "--label-threshold", t.label_threshold, "--region-size", t.region_size,
        "--thumbnail-mpp", CFG.tissue.thumbnail_mpp, "--tissue-min-area-um2", CFG.tissue.min_area_um2,
        "--tissue-min-saturation", CFG.tissue.min_saturation, "--tissue-closing-um", CFG.tissue.closing_um,
        "--tissue-max-hole-um2", CFG.tissue.max_hole_um2,
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
    """The train settings of one model (a method or a train.runs entry) as JSON: a param of the train rule."""
    return json.dumps(CFG.training_run(wildcards.method)[1].train.model_dump(mode="json"), sort_keys=True)


def get_train_stores(wildcards):
    """Patch stores of the slides the models learn from (splits train and val)."""
    return [
        f"{RESULTS}/tiles/{sid}.{STORE_EXT}"
        for sid, entry in sorted(SLIDES.items())
        if entry.split in ("train", "val")
    ]


def get_gpus(wildcards=None):
    """GPUs a training or inference job asks for: one when the config requests CUDA."""
    return 1 if CFG.train.device == "cuda" else 0


def get_train_gpus(wildcards=None):
    """GPUs a training job asks for: train.gpus when it asks for several (one torchrun process each)."""
    return CFG.train.gpus if CFG.train.gpus > 1 else get_gpus()


def get_train_launcher(wildcards=None):
    """The command that runs `wsi-scaat train`: under torchrun (DDP) when train.gpus > 1."""
    if CFG.train.gpus == 1:
        return WSI
    torchrun = f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone"
    return f"{torchrun} --nproc_per_node {CFG.train.gpus} -m wsi_scaat"


def get_checkpoint(wildcards):
    """The checkpoint that explains the cohort: the configured one, or the model trained here."""
    if CFG.model_checkpoint is not None:
        return str(CFG.model_checkpoint)
    return f"{RESULTS}/models/{wildcards.model}/best.pt"


def get_saliency_args(wildcards):
    """Flags of `wsi-scaat saliency` from the config, shell-quoted."""
    s = CFG.saliency
    args = ["--method", s.method, "--target", s.target, "--map-downsample", s.map_downsample,
            "--batch-size", s.batch_size, "--device", s.device, "--amp", str(s.amp).lower()]
    for key, value in sorted(s.options.items()):
        args += ["--option", f"{key}={value}"]
    return " ".join(shlex.quote(str(a)) for a in args)


def get_stitch_args(wildcards):
    """Flags of `wsi-scaat stitch` from the config, shell-quoted."""
    s = CFG.stitch
    args = ["--chunk", s.chunk, "--window", s.window, "--low-percentile", s.low_percentile,
            "--high-percentile", s.high_percentile, "--mask-tissue" if s.mask_tissue else "--no-mask-tissue"]
    if s.scheduler:
        args += ["--scheduler", s.scheduler]
    return " ".join(shlex.quote(str(a)) for a in args)


def get_export_args(wildcards):
    """Flags of `wsi-scaat export` from the config and the manifest, shell-quoted."""
    e = CFG.export
    args = ["--slide", SLIDES[wildcards.slide].path, "--colormap", e.colormap,
            "--overlay-alpha", e.overlay_alpha, "--region-threshold", e.region_threshold,
            "--min-region-area-um2", e.min_region_area_um2, "--thumbnail-size", e.thumbnail_size,
            "--tile-size", e.tile_size, "--region-smooth-um", e.region_smooth_um]
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
    """Every final output of the workflow: stores, models (unless given), exports per model and slide."""
    outputs = expand(f"{RESULTS}/tiles/{{slide}}.{STORE_EXT}", slide=sorted(SLIDES))
    if CFG.model_checkpoint is None:
        outputs += expand(f"{RESULTS}/models/{{method}}/best.pt", method=TRAINED)
    explained = sorted(s for s, e in SLIDES.items() if CFG.saliency.splits is None or e.split in CFG.saliency.splits)
    outputs += expand(f"{RESULTS}/export/{{model}}/{{slide}}.{{kind}}", model=CFG.models,
                      slide=explained, kind=["tiles.geojson", "regions.geojson", "overlay.png"])
    if EVAL_SLIDES:
        outputs.append(f"{RESULTS}/evaluation/metrics.csv")
    return outputs
