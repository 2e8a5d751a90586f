"""Colours, fonts and the matched-pair picture of the report's photo sheets and identify's review page (drawn with Pillow; the charts are matplotlib's, in
charts.py, in the same colours). Pillow >= 10.1 with FreeType gives a scalable font; without it, the
bitmap default font is used and text anchors are emulated.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
GAP = 8          # px between the two photos of a matched pair
MAX_LINES = 60   # inlier lines drawn on a pair (the rest would hide the photos)

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


def pair_image(q: np.ndarray, g: np.ndarray, qxy: np.ndarray, gxy: np.ndarray) -> Image.Image:
    """Two grey crops side by side (tops aligned), inliers as dots joined by lines."""
    h = max(q.shape[0], g.shape[0])
    canvas = Image.new("RGB", (q.shape[1] + GAP + g.shape[1], h), (255, 255, 255))
    canvas.paste(Image.fromarray(q).convert("RGB"), (0, 0))
    canvas.paste(Image.fromarray(g).convert("RGB"), (q.shape[1] + GAP, 0))
    d = ImageDraw.Draw(canvas)
    shift = q.shape[1] + GAP
    for i, ((x0, y0), (x1, y1)) in enumerate(zip(qxy, gxy)):
        if i < MAX_LINES:
            d.line([(x0, y0), (x1 + shift, y1)], fill=GREEN, width=2)
        for x, y in ((x0, y0), (x1 + shift, y1)):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=ORANGE, width=2)
    return canvas
