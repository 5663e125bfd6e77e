# Evaluation on the held-out slides: one job per model (every seed of every run), then the tables
# (per run: mean over seeds, bootstrap intervals, paired differences) and figures.


rule evaluate_model:
    input:
        checkpoint=CHECKPOINT,
        tiles=get_eval_stores,
        saliency=get_eval_saliency,
        heatmaps=get_eval_heatmaps,
    output:
        summary=f"{RESULTS}/evaluation/models/{{model}}.json",
        patches=f"{RESULTS}/evaluation/models/{{model}}.patches.csv",
        slides=f"{RESULTS}/evaluation/models/{{model}}.slides.npz",
    params:
        wsi=WSI,
        config=RESOLVED_CONFIG,
        settings=get_evaluate_json,
        outdir=get_grandparent,
    resources:
        gpu=GPUS,
    threads: 2
    conda:
        "envs/wsi-scaat.yaml"
    log:
        f"{RESULTS}/logs/evaluate/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}.tsv"
    shell:
        "{params.wsi} evaluate --config {params.config:q} --model {wildcards.model}"
        " --out {params.outdir:q} --no-report > {log:q} 2>&1"


rule evaluate:
    input:
        summaries=expand(f"{RESULTS}/evaluation/models/{{model}}.json", model=CFG.models),
        saliency=[get_eval_saliency({"model": m}) for m in CFG.runs],
    output:
        csv=f"{RESULTS}/evaluation/metrics.csv",
        runs=f"{RESULTS}/evaluation/runs.csv",
        table=report(
            f"{RESULTS}/evaluation/metrics.md",
            caption="report/metrics.rst",
            category="Evaluation",
        ),
        grid=report(
            f"{RESULTS}/evaluation/figure_grid.png",
            caption="report/figure_grid.rst",
            category="Evaluation",
        ),
        tradeoff=report(
            f"{RESULTS}/evaluation/tradeoff.png",
            caption="report/tradeoff.rst",
            category="Evaluation",
        ),
    params:
        wsi=WSI,
        config=RESOLVED_CONFIG,
        outdir=get_parent,
    threads: 1
    conda:
        "envs/wsi-scaat.yaml"
    log:
        f"{RESULTS}/logs/evaluate/report.log",
    shell:
        "{params.wsi} evaluate --config {params.config:q} --out {params.outdir:q} --report-only > {log:q} 2>&1"
