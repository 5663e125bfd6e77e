"""Whole-slide reading, tissue detection and the patch grid."""

from wsi_scaat.slides.reader import SlideInfo, SlideReader, open_slide

__all__ = ["SlideInfo", "SlideReader", "open_slide"]
