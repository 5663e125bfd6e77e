# Config validation and input helpers shared by the rule files.
import os
import re
import shlex
import sys

from wsi_scaat.config import validate_config
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.manifest import read_manifest

try:
    CFG = validate_config(config, source="snakemake config")
    SLIDES = {entry.slide_id: entry for entry in read_manifest(CFG.cohort.manifest)}
except WsiScaatError as err:
    sys.exit(f"wsi-scaat: error: {err}")

RESULTS = str(CFG.results)
STORE_EXT = CFG.tiling.format
# The package's CLI, run by the Python that runs Snakemake (no reliance on PATH).
WSI = f"{shlex.quote(sys.executable)} -m wsi_scaat"


wildcard_constraints:
    slide="|".join(re.escape(s) for s in SLIDES) or "(?!)",


def store_output(path):
    """Output declaration of a patch store: zarr stores are folders."""
    return directory(path) if STORE_EXT == "zarr" else path


def get_parent(wildcards, output):
    """Folder of a rule's first output (where the CLI writes)."""
    return os.path.dirname(output[0])


def get_slide_inputs(wildcards):
    """The slide file and, when the manifest names one, its annotations."""
    entry = SLIDES[wildcards.slide]
    inputs = {"slide": str(entry.path)}
    if entry.annotations is not None:
        inputs["annotations"] = str(entry.annotations)
    return inputs


def get_tile_args(wildcards):
    """Command-line flags of `wsi-scaat tile` for one slide, shell-quoted."""
    entry, t = SLIDES[wildcards.slide], CFG.tiling
    args = [
        "--patch-size", t.patch_size, "--target-mpp", t.target_mpp, "--overlap", t.overlap,
        "--min-tissue", t.min_tissue, "--format", t.format, "--compression", t.compression,
        "--label-threshold", t.label_threshold, "--thumbnail-mpp", CFG.tissue.thumbnail_mpp, "--region-size", t.region_size,
    ]
    if entry.annotations is not None:
        args += ["--annotations", entry.annotations]
    if entry.mpp is not None:
        args += ["--mpp-override", entry.mpp]
    return " ".join(shlex.quote(str(a)) for a in args)


def get_final_outputs():
    """Every final output of the stages that exist."""
    return expand(f"{RESULTS}/tiles/{{slide}}.{STORE_EXT}", slide=sorted(SLIDES))
