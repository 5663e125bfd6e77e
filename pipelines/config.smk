# The validated configuration, written once per cohort: later stages read it as their --config.


rule resolve_config:
    output:
        f"{RESULTS}/config.yaml",
    params:
        wsi=WSI,
        cfg=get_config_json,
    log:
        f"{RESULTS}/logs/resolve_config.log",
    shell:
        "{params.wsi} resolve-config --json {params.cfg:q} --out {output:q} > {log:q} 2>&1"
