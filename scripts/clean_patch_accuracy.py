"""Accuracy and AUROC of each model on the held-out patches, all of them and the unambiguous ones only.

The evaluation table labels a patch tumour when its tumour share is >= tiling.label_threshold, mixed
patches included. This splits the figure: patches whose share lies outside the training ignore band
(``train.ignore_band``; "clean") against all. Reads what the workflow wrote: the patch stores'
``lesion_fraction`` and the saliency stores' class probabilities.

    python scripts/clean_patch_accuracy.py configs/wsss4luad.yaml
"""

from __future__ import annotations

import sys

import numpy as np
import zarr

from wsi_scaat.config import load_config
from wsi_scaat.manifest import read_manifest
from wsi_scaat.metrics.ranking import auroc
from wsi_scaat.store import open_store


def main(*configs: str) -> None:
    cfg = load_config(*configs)
    low, high = cfg.train.ignore_band or (cfg.tiling.label_threshold, cfg.tiling.label_threshold)
    ids = [e.slide_id for e in read_manifest(cfg.cohort.manifest) if e.split in cfg.evaluate.splits]
    fraction = []
    for sid in ids:
        with open_store(cfg.results / "tiles" / f"{sid}.{cfg.tiling.format}") as store:
            fraction.append(store.array("lesion_fraction"))
    f = np.concatenate(fraction)
    y, clean = f >= cfg.tiling.label_threshold, (f <= low) | (f >= high)
    print(
        f"{len(ids)} held-out images, {len(f)} patches, {int(clean.sum())} clean (<= {low:g} or >= {high:g})"
    )
    print(
        "| model | accuracy (all) | AUROC (all) | accuracy (clean) | AUROC (clean) |\n|---|---|---|---|---|"
    )
    for model in cfg.models:
        folder = cfg.results / "saliency" / model
        probs = [zarr.open_group(str(folder / f"{sid}.saliency.zarr"), mode="r")["probs"] for sid in ids]
        p = np.concatenate([np.asarray(a)[:, -1] for a in probs])
        hit = (p >= 0.5) == y
        figures = (hit.mean(), auroc(p, y), hit[clean].mean(), auroc(p[clean], y[clean]))
        print(f"| {model} | " + " | ".join(f"{v:.3f}" for v in figures) + " |")


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["configs/wsss4luad.yaml"]))
