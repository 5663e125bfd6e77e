# Stitching: the patch maps of one slide blended into a heatmap pyramid, out of core with dask.


rule stitch:
    input:
        f"{RESULTS}/saliency/{{model}}/{{slide}}.saliency.zarr",
    output:
        directory(f"{RESULTS}/heatmaps/{{model}}/{{slide}}.heatmap.zarr"),
    params:
        wsi=WSI,
        args=STITCH_ARGS,
    threads: 2
    conda:
        "envs/wsi-scaat.yaml"
    log:
        f"{RESULTS}/logs/stitch/{{model}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/stitch/{{model}}/{{slide}}.tsv"
    shell:
        "{params.wsi} stitch {input:q} --out {output:q} {params.args} > {log:q} 2>&1"
