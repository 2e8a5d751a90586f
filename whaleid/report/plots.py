"""plots: line plots drawn with Pillow alone (axes, round ticks, grid, labels, dashed markers, a legend),
for the report's training curves and threshold sweep.

A plotting library would be a large dependency for two small charts, so this is the few pieces they need.
Also the colours and the font helpers, which the report's photo sheets share. Pillow >= 10.1 with FreeType
gives a scalable font; without it, the bitmap default font is used and text anchors are emulated.
"""
from __future__ import annotations

import math

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


def draw_text(d: ImageDraw.ImageDraw, xy, text: str, fnt, anchor: str, fill=INK) -> None:
    """Text at `xy` placed by a Pillow anchor ("lm", "mt", "rm", ...), emulated for the bitmap font
    (which has none): left-top, shifted by its measured width and a fixed height."""
    if scalable():
        d.text(xy, text, fill=fill, font=fnt, anchor=anchor)
        return
    x, y = xy
    x -= {"l": 0, "m": fnt.getlength(text) / 2, "r": fnt.getlength(text)}[anchor[0]]
    y -= {"t": 0, "m": 6, "b": 12, "s": 12}[anchor[1]]
    d.text((x, y), text, fill=fill, font=fnt)


def nice_step(span: float, n: int) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at least span / n."""
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw - 1e-12:
            return m * mag
    return 10 * mag


def ticks(lo: float, hi: float, n: int = 6, integer: bool = False) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] and the decimals to print them with."""
    step = nice_step(hi - lo, n)
    if integer:
        step = max(1.0, round(step))
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    out = []
    v = math.ceil(lo / step - 1e-9) * step
    while v <= hi + 1e-9 * max(1.0, abs(hi)):
        out.append(round(v, 10))
        v += step
    return out, decimals


def axis_range(values, floor: float | None = None, ceil: float | None = None) -> tuple[float, float]:
    """An axis range for the finite `values` with 5% padding, reaching down to `floor` (not padded
    below it) and up to `ceil`; a flat or empty series gets a range of 1."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    if floor is not None:
        lo = min(lo, floor)
    if ceil is not None:
        hi = max(hi, ceil)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    return (lo if floor is not None and lo >= floor else lo - pad), hi + pad


class Plot:
    """A line plot drawn at 2x and downsampled (smooth lines): axes, ticks, grid, title, axis labels
    and a legend below the axes."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim, ylim, size=(720, 460), integer_x=False):
        self.s = s = 2 if scalable() else 1
        self.w, self.h = size
        self.xlim, self.ylim = xlim, ylim
        self.l, self.r, self.t, self.b = 72, 22, 46, 58
        self.img = Image.new("RGB", (self.w * s, self.h * s), BG)
        self.d = ImageDraw.Draw(self.img)
        self.legend: list[tuple[str, tuple, str]] = []   # label, colour, kind (line / line+dot / dash / dot)
        f, tf = font(12 * s), font(16 * s)
        x0, y0, x1, y1 = self.px(xlim[0], ylim[1]) + self.px(xlim[1], ylim[0])
        xt, xd = ticks(*xlim, n=8, integer=integer_x)
        yt, yd = ticks(*ylim, n=6)
        for v in yt:
            if ylim[0] - 1e-9 <= v <= ylim[1] + 1e-9:
                _, y = self.px(xlim[0], v)
                self.d.line([(x0, y), (x1, y)], fill=GRID, width=s)
                self.d.line([(x0 - 5 * s, y), (x0, y)], fill=INK, width=s)
                draw_text(self.d, (x0 - 8 * s, y), f"{v:.{yd}f}", f, "rm")
        for v in xt:
            if xlim[0] - 1e-9 <= v <= xlim[1] + 1e-9:
                x, _ = self.px(v, ylim[0])
                self.d.line([(x, y0), (x, y1)], fill=GRID, width=s)
                self.d.line([(x, y1), (x, y1 + 5 * s)], fill=INK, width=s)
                draw_text(self.d, (x, y1 + 8 * s), f"{v:.{xd}f}", f, "mt")
        self.d.rectangle([x0, y0, x1, y1], outline=INK, width=s)
        draw_text(self.d, (self.w * s / 2, 10 * s), title, tf, "mt")
        draw_text(self.d, ((x0 + x1) / 2, self.h * s - 8 * s), xlabel, f, "mb")
        lab = Image.new("RGB", (int(f.getlength(ylabel)) + 4 * s, 16 * s), BG)  # the y label, rotated
        ImageDraw.Draw(lab).text((2 * s, 1 * s), ylabel, fill=INK, font=f)
        lab = lab.rotate(90, expand=True)
        self.img.paste(lab, (6 * s, int((y0 + y1) / 2 - lab.height / 2)))

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Data coordinates to pixels of the (2x) drawing: xlim spans the axes left to right, ylim bottom to top."""
        s = self.s
        (a, b), (c, e) = self.xlim, self.ylim
        px = self.l + (x - a) / (b - a) * (self.w - self.l - self.r)
        py = self.h - self.b - (y - c) / (e - c) * (self.h - self.t - self.b)
        return px * s, py * s

    def line(self, xs, ys, color, label: str | None = None, markers: bool = True, width: int = 2):
        """A polyline through the finite points, with a dot on each when `markers` (or when only one)."""
        pts = [self.px(x, y) for x, y in zip(xs, ys) if np.isfinite(x) and np.isfinite(y)]
        if len(pts) > 1:
            self.d.line(pts, fill=color, width=width * self.s, joint="curve")
        if markers or len(pts) == 1:
            for p in pts:
                self._dot(self.d, p, color, 3)
        self._label(label, color, "line+dot" if markers else "line")

    def vline(self, x, color, label: str | None = None):
        self._dashed(self.d, self.px(x, self.ylim[0]), self.px(x, self.ylim[1]), color)
        self._label(label, color, "dash")

    def hline(self, y, color, label: str | None = None):
        self._dashed(self.d, self.px(self.xlim[0], y), self.px(self.xlim[1], y), color)
        self._label(label, color, "dash")

    def point(self, x, y, color, label: str | None = None, radius: int = 6):
        """A dot with a white ring, so it stands out on the line it marks."""
        p = self.px(x, y)
        self._dot(self.d, p, (255, 255, 255), radius + 2)
        self._dot(self.d, p, color, radius)
        self._label(label, color, "dot")

    def _label(self, label: str | None, color, kind: str):
        if label:
            self.legend.append((label, color, kind))

    def _dot(self, d, p, color, radius):
        r = radius * self.s
        d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=color)

    def _dashed(self, d, a, b, color, width=2):
        (x0, y0), (x1, y1) = a, b
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / (8 * self.s)))
        for i in range(0, n, 2):
            t0, t1 = i / n, min(1.0, (i + 1) / n)
            d.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)],
                   fill=color, width=width * self.s)

    def render(self) -> Image.Image:
        """The plot with its legend in a strip below the axes: a legend inside the axes always covers
        some curve (a short history leaves no empty corner), and an entry hidden there is unreadable."""
        s = self.s
        img = self.img if s == 1 else self.img.resize((self.w, self.h), Image.Resampling.LANCZOS)
        if not self.legend:
            return img
        f = font(12 * s)
        lh, gap = 20 * s, 22 * s
        widths = [int(f.getlength(t)) + 40 * s for t, _, _ in self.legend]
        avail = (self.w - self.l - self.r) * s
        rows, x = [[]], 0
        for i, wid in enumerate(widths):  # flow the entries left to right, wrapping
            if rows[-1] and x + wid > avail:
                rows.append([])
                x = 0
            rows[-1].append(i)
            x += wid + gap
        strip = Image.new("RGB", (self.w * s, lh * len(rows) + 10 * s), BG)
        d = ImageDraw.Draw(strip)
        for r, items in enumerate(rows):
            cx = self.l * s
            yy = 4 * s + r * lh + lh / 2
            for i in items:
                label, color, kind = self.legend[i]
                if kind.startswith("line"):
                    d.line([(cx + 2 * s, yy), (cx + 26 * s, yy)], fill=color, width=2 * s)
                    if kind == "line+dot":
                        self._dot(d, (cx + 14 * s, yy), color, 3)
                elif kind == "dash":
                    self._dashed(d, (cx + 2 * s, yy), (cx + 28 * s, yy), color)
                else:
                    self._dot(d, (cx + 14 * s, yy), color, 5)
                draw_text(d, (cx + 32 * s, yy), label, f, "lm")
                cx += widths[i] + gap
        if s > 1:
            strip = strip.resize((self.w, strip.height // s), Image.Resampling.LANCZOS)
        out = Image.new("RGB", (self.w, img.height + strip.height), BG)
        out.paste(img, (0, 0))
        out.paste(strip, (0, img.height))
        return out
