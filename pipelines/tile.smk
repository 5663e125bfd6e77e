# Tiling: tissue mask, patch grid at the target mpp, one patch store per slide.


rule tile:
    input:
        unpack(get_slide_inputs),
    output:
        store=store_output(f"{RESULTS}/tiles/{{slide}}.{STORE_EXT}"),
        mask=f"{RESULTS}/tiles/{{slide}}.tissue.png",
        outline=f"{RESULTS}/tiles/{{slide}}.tissue.geojson",
    params:
        wsi=WSI,
        slide=get_slide_path,
        args=get_tile_args,
        outdir=get_parent,
    conda:
        "envs/wsi-scaat.yaml"
    log:
        f"{RESULTS}/logs/tile/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tile/{{slide}}.tsv"
    threads: 2
    shell:
        "{params.wsi} tile {params.slide:q} --out {params.outdir:q} --slide-id {wildcards.slide:q}"
        " --workers {threads} --no-progress {params.args} > {log:q} 2>&1"
