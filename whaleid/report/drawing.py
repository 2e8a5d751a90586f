"""Colours and fonts of the report's photo sheets (drawn with Pillow; the charts are matplotlib's, in
charts.py, in the same colours). Pillow >= 10.1 with FreeType gives a scalable font; without it, the
bitmap default font is used and text anchors are emulated.
"""
from __future__ import annotations

from PIL import ImageFont

BG = (255, 255, 255)
PANEL = (228, 228, 228)
INK = (20, 20, 20)
GREY = (110, 110, 110)
RED = (220, 30, 30)
GREEN = (20, 150, 40)
BLUE = (30, 90, 200)
ORANGE = (235, 130, 0)
PURPLE = (130, 60, 170)
GRID = (235, 235, 235)

_FONTS: dict[int, ImageFont.ImageFont] = {}


def font(size: int):
    """The default font at `size` (cached); the fixed-size bitmap font when Pillow cannot scale it."""
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
        except (TypeError, OSError, ImportError):
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def scalable() -> bool:
    return isinstance(font(14), ImageFont.FreeTypeFont)


def fit(fnt, text: str, width: float) -> str:
    """`text` shortened with '...' so it fits `width` pixels."""
    if fnt.getlength(text) <= width:
        return text
    while text and fnt.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
