"""A cohort from images with label masks: QuPath annotations per image, a seeded split by image,
and the manifest (``wsi-scaat manifest-from-masks``; ``make real`` runs it on WSSS4LUAD).

Images and masks pair by file stem (``img/07.png`` with ``mask/07.png``); an image without a mask,
or a mask without an image, is an error naming them. Each image's slide label is 1 when its mask
holds the ``positive`` class. The split is stratified by that label: within each label, images are
shuffled with ``seed`` and the ``test`` and ``val`` counts are shared out in proportion (largest
remainders), the rest is ``train``. Every file is written only when its content changes, so a
second run leaves the workflow's inputs untouched (Snakemake re-runs nothing).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from wsi_scaat.annotations_from_masks import masks_to_geojson, write_if_changed
from wsi_scaat.errors import WsiScaatError
from wsi_scaat.manifest import check_slide_id

#: Image suffixes taken from the images folder (plain images and TIFFs; see ``wsi_scaat.slides``).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def _files(folder: Path, suffixes: set[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise WsiScaatError(folder, "folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes and path.is_file():
            if path.stem in files:
                raise WsiScaatError(
                    folder, f"two files named {path.stem}: {files[path.stem].name}, {path.name}"
                )
            files[path.stem] = path
    if not files:
        raise WsiScaatError(folder, f"no image files ({', '.join(sorted(suffixes))})")
    return files


def pair_images(images: Path, masks: Path) -> list[tuple[str, Path, Path]]:
    """``(stem, image, mask)`` for every image, in stem order; unpaired files are an error."""
    imgs, msks = _files(Path(images), IMAGE_SUFFIXES), _files(Path(masks), IMAGE_SUFFIXES)
    for folder, missing in ((masks, sorted(set(imgs) - set(msks))), (images, sorted(set(msks) - set(imgs)))):
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise WsiScaatError(folder, f"no file for {', '.join(missing[:3])}{more} of the other folder")
    return [(stem, imgs[stem], msks[stem]) for stem in sorted(imgs)]


def split_by_image(labels: Mapping[str, int], test: int, val: int, seed: int) -> dict[str, str]:
    """Image id -> ``train``/``val``/``test``: ``test`` and ``val`` images, stratified by label, seeded."""
    ids = sorted(labels)
    if test + val > len(ids):
        raise ValueError(f"test ({test}) + val ({val}) is more than the {len(ids)} images")
    groups = {lab: [i for i in ids if labels[i] == lab] for lab in sorted(set(labels.values()))}
    shares = {}
    for split, count in (("test", test), ("val", val)):
        exact = {lab: count * len(group) / len(ids) for lab, group in groups.items()}
        alloc = {lab: int(v) for lab, v in exact.items()}
        by_remainder = sorted(groups, key=lambda lab: (-(exact[lab] - alloc[lab]), lab))
        for lab in by_remainder[: count - sum(alloc.values())]:
            alloc[lab] += 1
        shares[split] = alloc
    rng = np.random.default_rng(seed)
    out = {}
    for lab, group in groups.items():
        order = [group[k] for k in rng.permutation(len(group))]
        n_test, n_val = shares["test"][lab], shares["val"][lab]
        for k, image_id in enumerate(order):
            out[image_id] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return out


def build_mask_cohort(
    images: str | Path,
    masks: str | Path,
    out: str | Path,
    classes: Mapping[int, str],
    *,
    positive: str,
    mpp: float,
    ignore: Iterable[int] = (),
    test: int = 20,
    val: int = 8,
    seed: int = 0,
    downsample: float = 1.0,
) -> tuple[Path, dict[str, int]]:
    """Write ``<out>/annotations/<id>.geojson`` per image and ``<out>/manifest.csv``.

    Paths in the manifest are relative to it; ``mpp`` is every image's level-0 microns per pixel
    and ``downsample`` the masks' (level-0 pixels per mask pixel). Returns the manifest's path and
    the number of images per split.
    """
    if positive not in classes.values():
        raise ValueError(
            f"positive class {positive!r} is not one of --classes ({', '.join(classes.values())})"
        )
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    out = Path(out)
    rows, labels = [], {}
    for stem, image, mask in pair_images(Path(images), Path(masks)):
        slide_id = check_slide_id(stem)
        ann = out / "annotations" / f"{slide_id}.geojson"
        per_class = masks_to_geojson(mask, ann, classes, ignore, downsample)
        labels[slide_id] = int(per_class[positive] > 0)
        rows.append((slide_id, image, ann))
    splits = split_by_image(labels, test, val, seed)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "path", "split", "label", "annotations", "mpp"])
    for slide_id, image, ann in rows:
        rel = os.path.relpath(Path(image).resolve(), out.resolve())
        writer.writerow(
            [slide_id, rel, splits[slide_id], labels[slide_id], f"annotations/{ann.name}", repr(float(mpp))]
        )
    manifest = out / "manifest.csv"
    write_if_changed(manifest, buf.getvalue())
    counts = {s: sum(1 for v in splits.values() if v == s) for s in ("train", "val", "test")}
    return manifest, counts
