# Training: one patch classifier per method listed in train.methods; with train.gpus > 1, one
# torchrun job of that many processes (DistributedDataParallel, train.batch_size the global batch).
# last.pt and best-epoch<k>.pt are written but not declared, so that Snakemake keeps them and a
# re-run after a kill (--rerun-incomplete) resumes from last.pt and restores the best.pt it deleted
# (see "Resuming after a crash" in docs/contracts.md).


rule train:
    input:
        stores=get_train_stores,
    output:
        best=f"{RESULTS}/models/{{method}}/best.pt",
        metrics=f"{RESULTS}/models/{{method}}/metrics.csv",
        curves=report(
            f"{RESULTS}/models/{{method}}/curves.png",
            caption="report/curves.rst",
            category="Training",
            subcategory="{method}",
        ),
    params:
        wsi=get_train_launcher,
        train=get_train_json,
        config=RESOLVED_CONFIG,
        outdir=get_parent,
    resources:
        gpu=get_train_gpus,
    threads: 2
    conda:
        "envs/wsi-scaat.yaml"
    log:
        f"{RESULTS}/logs/train/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{method}}.tsv"
    shell:
        "{params.wsi} train --config {params.config:q} --method {wildcards.method}"
        " --out {params.outdir:q} --resume --no-progress > {log:q} 2>&1"
