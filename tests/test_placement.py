"""Heatmaps land on the slide: a map that is 1 on a lesion's patches lights up that lesion, at level 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely
import zarr
from shapely.ops import unary_union

from wsi_scaat.annotations import read_annotations
from wsi_scaat.heatmaps import stitch
from wsi_scaat.saliency.store import create_saliency_store
from wsi_scaat.slides.tiling import TileParams, tile_slide
from wsi_scaat.store import open_store


def test_lesion_saliency_lands_inside_the_lesion(synth_slide: tuple[Path, Path], tmp_path: Path) -> None:
    slide, ann = synth_slide
    store_path = tile_slide(slide, tmp_path, TileParams(patch_size=32, target_mpp=1.0, min_tissue=0.5),
                            slide_id="s", annotations=ann, progress=False)  # fmt: skip
    with open_store(store_path) as store:
        attrs, coords = store.attrs, store.coords
        inside = store.array("lesion_fraction") == 1.0  # patches wholly inside the lesion
        tissue = store.array("tissue_mask")
    assert attrs["patch_size_level0"] == 64 and inside.sum() >= 5
    maps = np.zeros((len(coords), 32, 32), np.float32)
    maps[inside] = 1.0
    sal = tmp_path / "s.saliency.zarr"
    meta = {**attrs, "map_size": 32, "map_downsample": 1, "class_names": ["normal", "lesion"],
            "saliency_method": "test", "saliency_target": "lesion"}  # fmt: skip
    with create_saliency_store(sal, len(coords), 2, 32, meta) as writer:
        writer.write_array("coords", coords)
        writer.write_array("tissue_mask", tissue)
        writer.write(0, maps, np.full((len(coords), 2), 0.5), np.ones(len(coords), np.int64))
    heat_path = stitch(
        sal, tmp_path / "s.heatmap.zarr", chunk=128, normalize=False, mask_tissue=False, value="saliency"
    )  # the maps themselves
    heat = zarr.open_group(str(heat_path), mode="r")
    level0 = np.asarray(heat["0"][...])
    hd = heat.attrs["heatmap_downsample"]
    assert hd == 2.0 and level0.shape == (int(np.ceil(1536 / hd)), int(np.ceil(2048 / hd)))

    lesion = unary_union(read_annotations(ann))
    rows, cols = np.nonzero(level0 > 0.999)
    centres = shapely.points((cols + 0.5) * hd, (rows + 0.5) * hd)  # heatmap pixel centres, level 0
    assert len(centres) == inside.sum() * 32 * 32  # every lit pixel belongs to a lit patch...
    assert shapely.covers(lesion, centres).all()  # ...and lies inside the lesion polygon
    # conversely, the lesion's core (more than a patch diagonal from its border) is lit
    core = lesion.buffer(-2 * 64)
    rng = np.random.default_rng(0)
    xmin, ymin, xmax, ymax = core.bounds
    pts = rng.uniform((xmin, ymin), (xmax, ymax), size=(4000, 2))
    pts = pts[shapely.contains_xy(core, pts[:, 0], pts[:, 1])]
    assert len(pts) > 20
    values = level0[(pts[:, 1] / hd).astype(int), (pts[:, 0] / hd).astype(int)]
    assert (values > 0.999).all()
