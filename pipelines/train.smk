# Training: one patch classifier per method listed in train.methods; with train.gpus > 1, one
# torchrun job of that many processes (DistributedDataParallel, train.batch_size the global batch).
# last.pt and best-epoch<k>.pt are written but not declared, so that Snakemake keeps them and a
# re-run after a kill (--rerun-incomplete) resumes from last.pt and restores the best.pt it deleted
# (see "Resuming after a crash" in docs/contracts.md).


# The train and val stores, listed in one file that every model's training depends on: Snakemake
# looks for the requested file in the input list of its producer each time a job asks for it, so a
# training job with the whole cohort as inputs, asked for by every saliency job, would make the DAG
# quadratic in the slides. A local job: it only writes the list.
rule train_stores:
    input:
        get_train_stores,
    output:
        TRAIN_STORES,
    log:
        f"{RESULTS}/logs/train_stores.log",
    localrule: True
    run:
        write_store_list(output[0], input)


rule train:
    input:
        stores=TRAIN_STORES,
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
        gpu=TRAIN_GPUS,
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
