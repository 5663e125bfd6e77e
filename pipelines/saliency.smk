# Saliency: class probabilities and saliency maps of every patch, per model and slide.


rule saliency:
    input:
        store=f"{RESULTS}/tiles/{{slide}}.{STORE_EXT}",
        checkpoint=CHECKPOINT,
    output:
        directory(f"{RESULTS}/saliency/{{model}}/{{slide}}.saliency.zarr"),
    params:
        wsi=WSI,
        args=SALIENCY_ARGS,
        outdir=get_parent,
    resources:
        gpu=GPUS,
    threads: 2
    conda:
        "envs/wsi-scaat.yaml"
    log:
        f"{RESULTS}/logs/saliency/{{model}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/saliency/{{model}}/{{slide}}.tsv"
    shell:
        "{params.wsi} saliency --checkpoint {input.checkpoint:q} --store {input.store:q}"
        " --out {params.outdir:q} {params.args} --no-progress > {log:q} 2>&1"
