# Export for review: OME-TIFF heatmaps, PNG overlays and figure, QuPath GeoJSON (tiles, regions).


rule export:
    input:
        unpack(get_slide_inputs),
        heatmap=f"{RESULTS}/heatmaps/{{model}}/{{slide}}.heatmap.zarr",
        saliency=f"{RESULTS}/saliency/{{model}}/{{slide}}.saliency.zarr",
    output:
        tiles=f"{RESULTS}/export/{{model}}/{{slide}}.tiles.geojson",
        regions=f"{RESULTS}/export/{{model}}/{{slide}}.regions.geojson",
        overlay=report(
            f"{RESULTS}/export/{{model}}/{{slide}}.overlay.png",
            caption="report/overlay.rst",
            category="Heatmaps",
            subcategory="{model}",
        ),
        heatmap_png=f"{RESULTS}/export/{{model}}/{{slide}}.heatmap.png",
        thumbnail=f"{RESULTS}/export/{{model}}/{{slide}}.thumbnail.png",
        figure=f"{RESULTS}/export/{{model}}/{{slide}}.figure.png",
        ome_tiff=f"{RESULTS}/export/{{model}}/{{slide}}.heatmap.ome.tif",
        ome_tiff_rgb=f"{RESULTS}/export/{{model}}/{{slide}}.heatmap_rgb.ome.tif",
    params:
        wsi=WSI,
        args=get_export_args,
        outdir=get_parent,
    threads: 1
    conda:
        "envs/wsi-scaat.yaml"
    log:
        f"{RESULTS}/logs/export/{{model}}/{{slide}}.log",
    shell:
        "{params.wsi} export {input.heatmap:q} --saliency {input.saliency:q} --out {params.outdir:q}"
        " {params.args} > {log:q} 2>&1"
