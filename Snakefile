# wsi-scaat workflow: table of contents. Logic lives in the wsi_scaat package.
#   snakemake --cores 2 --configfile configs/demo.yaml
from snakemake.utils import min_version

min_version("8.0")


configfile: "configs/default.yaml"


include: "pipelines/common.smk"
include: "pipelines/tile.smk"
include: "pipelines/train.smk"
include: "pipelines/saliency.smk"
include: "pipelines/stitch.smk"
include: "pipelines/export.smk"
include: "pipelines/evaluate.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True


# After every run, failed or not (--keep-going included): results/<cohort>/run_summary.csv.
onsuccess:
    from wsi_scaat.run_summary import summarize_quietly

    summarize_quietly(CFG, SLIDES.values())


onerror:
    from wsi_scaat.run_summary import summarize_quietly

    summarize_quietly(CFG, SLIDES.values())
