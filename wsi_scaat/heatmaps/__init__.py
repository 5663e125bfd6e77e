"""Slide-level heatmaps: out-of-core stitching into zarr pyramids, and the exports for review.

The layouts of the saliency store (input) and of the heatmap pyramid (output) are documented in
docs/contracts.md.
"""

from wsi_scaat.heatmaps.stitching import blend_window, heatmap_level0, stitch, stitch_dense

__all__ = ["blend_window", "heatmap_level0", "stitch", "stitch_dense"]
