"""Slide-level heatmaps: out-of-core stitching into zarr pyramids, and exports for review.

CONTRACTS (the "CONTRACTS_PLACEHOLDER" of your task; also in docs/contracts.md):

## Data contracts (fixed; other stages rely on them)

**Saliency store** `<slide_id>.saliency.zarr` (zarr v3 group), written and read by `wsi_scaat/saliency/store.py` (exists; read it):
`coords` (N,2) int64 top-left x,y of each patch in level-0 slide pixels; `probs` (N,K) float32 class probabilities; `target` (N,) int64 class explained;
`maps` (N,h,w) float16 = |attribution| summed over colour channels, h = w = attrs["map_size"], chunked (64,h,w); `tissue_mask` 2-D uint8 (1 = tissue) whose pixel covers attrs["tissue_downsample"] level-0 pixels.
Attributes include: slide_id, source_path (the slide file), slide_width, slide_height (level 0), mpp_level0, patch_size (px), patch_size_level0 (level-0 px covered by a patch), map_size, map_downsample, class_names (list), saliency_method, saliency_target, tissue_downsample. `open_saliency_store(path)` gives `.coords`, `.maps` (lazy zarr array), `.array(name)`, `.attrs`, `.map_pixel_level0` (= patch_size_level0 / map_size, level-0 px per map pixel). `create_saliency_store(final, n, n_classes, map_size, attrs)` is a context manager yielding a writer with `.write(start, maps, probs, target)` and `.write_array(name, data)` (use it for test fixtures).

**Heatmap pyramid** `<slide_id>.heatmap.zarr` (zarr v3 group), written by `wsi_scaat/heatmaps/stitching.py`:
arrays `"0"`, `"1"`, ... `"L-1"`: 2-D float32 (H_k, W_k), values in [0, 1] after per-slide normalisation, chunked (C, C) (C = chunk size, default 1024); level k is level 0 reduced by 2^k (mean of 2x2 blocks, sizes ceil(H/2)), down to a level whose longer side is <= 512.
Level 0 of the heatmap: pixel (r, c) covers level-0 slide pixels [c*hd, (c+1)*hd) x [r*hd, (r+1)*hd) where hd = attrs["heatmap_downsample"] = the saliency store's map_pixel_level0; H_0 = ceil(slide_height / hd), W_0 = ceil(slide_width / hd). A patch with coords (x, y) covers heatmap columns round(x/hd) .. round(x/hd)+map_size-1 (and rows likewise).
Attributes: every saliency-store attribute, plus heatmap_downsample (float), level_downsamples ([1, 2, 4, ...] relative to heatmap level 0), normalization {"method": "percentile", "low_percentile": p_lo, "high_percentile": p_hi, "low": v_lo, "high": v_hi}, window ("hann" | "flat"), heatmap_version 1, and OME-NGFF-style "multiscales" metadata (axes y, x of type space in micrometer; per dataset path "k" a coordinateTransformations scale [mpp_level0*hd*2^k, mpp_level0*hd*2^k]).
Pixels outside the tissue mask and pixels covered by no patch are 0.
"""  # noqa: E501 - the contract, verbatim

from wsi_scaat.heatmaps.stitching import blend_window, heatmap_level0, stitch, stitch_dense

__all__ = ["blend_window", "heatmap_level0", "stitch", "stitch_dense"]
