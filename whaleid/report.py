"""report: a look at a run's artifacts, as PNG contact sheets and plots plus an index.html that shows them.

    write_report(work, data) -> WORK/report/index.html

Sections (each reads its stage's CSV/JSON artifacts directly; a stage that has not run is one line
of the page, never an error; nothing is unpickled):

  1. boxes        boxes/BB_TRAIN.csv, BB_TEST.csv   -> boxes_<method>.png: a sample of train and test
                  photos per box method with the box drawn, and every full-image fallback (48 a sheet,
                  up to 960)
  2. duplicates   dedup/dedup_report.csv            -> dedup_<page>.png: groups side by side, conflicts first
  3. training     train/history.csv                 -> training_curves.png: loss and accuracy, train vs
                  validation, best epoch marked
  4. threshold    evaluate/threshold_sweep.csv, metrics.json -> threshold_map5.png: MAP@5 against the
                  new_whale threshold, configured / best threshold and the all-new_whale baseline
  5. predictions  predict/predictions.csv, format/train.csv, boxes/ -> predictions.png: query photo
                  (cropped to its box) beside one training photo of each of its top-3 known ids, with
                  new_whale shown at its rank when the submission puts it before them

Photos are decoded at reduced size (JPEG draft mode) through whaleid.images; an unreadable photo is
left out and counted. Drawing uses Pillow only. Every PNG and the page are written atomically; PNGs a
previous report wrote that this one did not (a section gone) are removed, so the folder matches the page.
"""
from __future__ import annotations

import html
import json
import math
import os
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from . import images
from .stage import MANIFEST, atomic_path

NEW_WHALE = "new_whale"
FULL_IMAGE = "full-image"
FULL_IMAGE_PER_PAGE = 48     # full-image fallbacks per sheet (6 columns)
FULL_IMAGE_CAP = 960         # fallbacks shown in all (20 sheets): every one, unless detection failed wholesale
DEDUP_GROUP_CAP = 48         # duplicate groups shown (conflicts first)
DEDUP_MEMBER_CAP = 6         # photos shown per group
DEDUP_GROUPS_PER_PAGE = 12
TOP_SHOWN = 3                # predicted known ids (with photos) shown per query
TILE = (240, 170)            # image area of a tile, pixels
CROP_MARGIN = 0.05           # context around a box when cropping to it
PREFIXES = ("boxes_", "dedup_", "training_curves", "threshold_map5", "predictions")

BG = (255, 255, 255)
PANEL = (228, 228, 228)
INK = (20, 20, 20)
GREY = (110, 110, 110)
RED = (220, 30, 30)
GREEN = (20, 150, 40)
BLUE = (30, 90, 200)
ORANGE = (235, 130, 0)
PURPLE = (130, 60, 170)


class _Missing(Exception):
    """An artifact a section needs is absent or unusable; the message is the section's note."""


# ---------------------------------------------------------------- fonts and text

_FONTS: dict[int, ImageFont.ImageFont] = {}


def _font(size: int):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
        except (TypeError, OSError, ImportError):
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _scalable() -> bool:
    return isinstance(_font(14), ImageFont.FreeTypeFont)


def _text_w(font, text: str) -> float:
    return font.getlength(text)


def _fit(font, text: str, width: float) -> str:
    """`text` shortened with '...' so it fits `width` pixels."""
    if _text_w(font, text) <= width:
        return text
    while text and _text_w(font, text + "...") > width:
        text = text[:-1]
    return text + "..."


# ---------------------------------------------------------------- photos and tiles

def _load(path: Path, want: int):
    """(RGB image, x scale, y scale) from file pixels to the decoded image, or None if unreadable."""
    try:
        img = images.open_image(path, draft_size=(want, want))
    except images.BadImage:
        return None
    fw, fh = img.info.get("file_size", img.size)
    img = images.to_rgb(img)
    if max(img.size) > 2 * want:
        img.thumbnail((2 * want, 2 * want), Image.Resampling.BILINEAR)
    return img, img.width / fw, img.height / fh


def _tile(img: Image.Image | None, lines: list[str], *, box=None, frame=None, placeholder: str | None = None,
          nlines: int = 2, size=TILE, line_colors=None) -> Image.Image:
    """A labelled tile: `img` fitted (letterboxed) into `size`, an optional box (in `img` pixels) drawn
    on it, a coloured frame, and `nlines` lines of text below. Without img, a blank tile saying
    `placeholder`."""
    w, h = size
    font = _font(13)
    lh = 16
    tile = Image.new("RGB", (w, h + nlines * lh + 6), BG)
    d = ImageDraw.Draw(tile)
    d.rectangle([0, 0, w - 1, h - 1], fill=PANEL)
    if img is not None:
        r = min((w - 12) / img.width, (h - 12) / img.height)  # a 6 px inset keeps a box on the edge visible
        tw, th = max(1, round(img.width * r)), max(1, round(img.height * r))
        ox, oy = (w - tw) // 2, (h - th) // 2
        tile.paste(img.resize((tw, th), Image.Resampling.BILINEAR), (ox, oy))
        if box is not None:
            x0, y0, x1, y1 = (ox + box[0] * r, oy + box[1] * r, ox + box[2] * r, oy + box[3] * r)
            # drawn just outside the box (its content stays visible), with a white halo for dark photos
            d.rectangle([x0 - 5, y0 - 5, x1 + 4, y1 + 4], outline=(255, 255, 255), width=2)
            d.rectangle([x0 - 3, y0 - 3, x1 + 2, y1 + 2], outline=RED, width=3)
    if placeholder:
        big = _font(20)
        text = _fit(big, placeholder, w - 10)
        d.text((w / 2, h / 2), text, fill=GREY, font=big, anchor="mm") if _scalable() else \
            d.text((8, h / 2 - 6), text, fill=GREY, font=big)
    if frame is not None:
        d.rectangle([0, 0, w - 1, h - 1], outline=frame, width=4)
    for i, line in enumerate(lines[:nlines]):
        color = (line_colors or {}).get(i, INK)
        d.text((3, h + 4 + i * lh), _fit(font, line, w - 6), fill=color, font=font)
    return tile


def _crop(loaded, box) -> Image.Image:
    """The decoded photo cropped to `box` (file pixels, x1/y1 exclusive) plus a small margin."""
    img, sx, sy = loaded
    if box is None:
        return img
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    mx, my = (x1 - x0) * CROP_MARGIN, (y1 - y0) * CROP_MARGIN
    c = (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(img.width, int(math.ceil(x1 + mx))),
         min(img.height, int(math.ceil(y1 + my))))
    if c[2] - c[0] < 2 or c[3] - c[1] < 2:
        return img
    return img.crop(c)


# ---------------------------------------------------------------- pages (sheets)

def _row(tiles: list[Image.Image], gap: int = 8, sep_after: int | None = None) -> Image.Image:
    """Tiles side by side; `sep_after` = index after which a wider gap with a rule is drawn."""
    extra = 16 if sep_after is not None and sep_after < len(tiles) - 1 else 0
    w = sum(t.width for t in tiles) + gap * max(0, len(tiles) - 1) + extra
    h = max(t.height for t in tiles)
    row = Image.new("RGB", (w, h), BG)
    x = 0
    for i, t in enumerate(tiles):
        row.paste(t, (x, 0))
        x += t.width + gap
        if extra and i == sep_after:
            ImageDraw.Draw(row).line([(x + extra // 2 - 4, 0), (x + extra // 2 - 4, h)], fill=GREY, width=2)
            x += extra
    return row


def _banner(text: str, width: int, fill=(240, 240, 240), color=INK, size: int = 14) -> Image.Image:
    font = _font(size)
    b = Image.new("RGB", (width, size + 10), fill)
    ImageDraw.Draw(b).text((6, 4), _fit(font, text, width - 12), fill=color, font=font)
    return b


def _page(title: str, blocks: list[Image.Image], subtitle: str = "", min_width: int = 640, gap: int = 10,
          pad: int = 12) -> Image.Image:
    """Blocks stacked vertically under a title."""
    width = max([min_width] + [b.width + 2 * pad for b in blocks])
    tfont, sfont = _font(20), _font(13)
    head = 34 + (20 if subtitle else 0)
    height = head + sum(b.height for b in blocks) + gap * max(0, len(blocks) - 1) + 2 * pad
    page = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(page)
    d.text((pad, 10), _fit(tfont, title, width - 2 * pad), fill=INK, font=tfont)
    if subtitle:
        d.text((pad, 36), _fit(sfont, subtitle, width - 2 * pad), fill=GREY, font=sfont)
    y = head + pad
    for b in blocks:
        page.paste(b, (pad, y))
        y += b.height + gap
    return page


def _grid(title: str, tiles: list[Image.Image], columns: int, subtitle: str = "") -> Image.Image:
    rows = [_row(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    return _page(title, rows, subtitle)


# ---------------------------------------------------------------- plots

def _nice_step(span: float, n: int) -> float:
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw - 1e-12:
            return m * mag
    return 10 * mag


def _ticks(lo: float, hi: float, n: int = 6, integer: bool = False) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] and the decimals to print them with."""
    step = _nice_step(hi - lo, n)
    if integer:
        step = max(1.0, round(step))
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * max(1.0, abs(hi)):
        ticks.append(round(v, 10))
        v += step
    return ticks, decimals


def _axis_range(values, floor: float | None = None, ceil: float | None = None) -> tuple[float, float]:
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


class _Plot:
    """A line plot drawn with Pillow at 2x and downsampled (smooth lines): axes, ticks, grid, title,
    axis labels and a legend below the axes."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim, ylim, size=(720, 460), integer_x=False):
        self.s = s = 2 if _scalable() else 1
        self.w, self.h = size
        self.xlim, self.ylim = xlim, ylim
        self.l, self.r, self.t, self.b = 72, 22, 46, 58
        self.img = Image.new("RGB", (self.w * s, self.h * s), BG)
        self.d = ImageDraw.Draw(self.img)
        self.legend: list[tuple[str, tuple, str]] = []   # label, colour, kind (line / dash / dot)
        f, tf = _font(12 * s), _font(16 * s)
        x0, y0, x1, y1 = self._px(xlim[0], ylim[1]) + self._px(xlim[1], ylim[0])
        xt, xd = _ticks(*xlim, n=8, integer=integer_x)
        yt, yd = _ticks(*ylim, n=6)
        for v in yt:
            if ylim[0] - 1e-9 <= v <= ylim[1] + 1e-9:
                _, y = self._px(xlim[0], v)
                self.d.line([(x0, y), (x1, y)], fill=(235, 235, 235), width=s)
                self.d.line([(x0 - 5 * s, y), (x0, y)], fill=INK, width=s)
                self._text((x0 - 8 * s, y), f"{v:.{yd}f}", f, "rm")
        for v in xt:
            if xlim[0] - 1e-9 <= v <= xlim[1] + 1e-9:
                x, _ = self._px(v, ylim[0])
                self.d.line([(x, y0), (x, y1)], fill=(235, 235, 235), width=s)
                self.d.line([(x, y1), (x, y1 + 5 * s)], fill=INK, width=s)
                self._text((x, y1 + 8 * s), f"{v:.{xd}f}", f, "mt")
        self.d.rectangle([x0, y0, x1, y1], outline=INK, width=s)
        self._text((self.w * s / 2, 10 * s), title, tf, "mt")
        self._text(((x0 + x1) / 2, self.h * s - 8 * s), xlabel, f, "mb")
        # rotated y label
        lw = int(_text_w(f, ylabel)) + 4 * s
        lab = Image.new("RGB", (lw, 16 * s), BG)
        ImageDraw.Draw(lab).text((2 * s, 1 * s), ylabel, fill=INK, font=f)
        lab = lab.rotate(90, expand=True)
        self.img.paste(lab, (6 * s, int((y0 + y1) / 2 - lab.height / 2)))

    def _text(self, xy, text, font, anchor):
        if _scalable():
            self.d.text(xy, text, fill=INK, font=font, anchor=anchor)
        else:  # the bitmap font has no anchors: left-top, shifted by its measured size
            w = _text_w(font, text)
            x, y = xy
            x -= {"l": 0, "m": w / 2, "r": w}[anchor[0]]
            y -= {"t": 0, "m": 6, "b": 12, "s": 12}[anchor[1]]
            self.d.text((x, y), text, fill=INK, font=font)

    def _px(self, x: float, y: float) -> tuple[float, float]:
        s = self.s
        (a, b), (c, e) = self.xlim, self.ylim
        px = self.l + (x - a) / (b - a) * (self.w - self.l - self.r)
        py = self.h - self.b - (y - c) / (e - c) * (self.h - self.t - self.b)
        return px * s, py * s

    def line(self, xs, ys, color, label: str | None = None, markers: bool = True, width: int = 2):
        pts = [self._px(x, y) for x, y in zip(xs, ys) if np.isfinite(x) and np.isfinite(y)]
        if len(pts) > 1:
            self.d.line(pts, fill=color, width=width * self.s, joint="curve")
        if markers or len(pts) == 1:
            for p in pts:
                self._dot(p, color, 3)
        if label:
            self.legend.append((label, color, "line+dot" if markers else "line"))

    def _dot(self, p, color, radius):
        r = radius * self.s
        self.d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=color)

    def _dashed(self, a, b, color, width=2):
        (x0, y0), (x1, y1) = a, b
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / (8 * self.s)))
        for i in range(0, n, 2):
            t0, t1 = i / n, min(1.0, (i + 1) / n)
            self.d.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)],
                        fill=color, width=width * self.s)

    def vline(self, x, color, label: str | None = None):
        a, b = self._px(x, self.ylim[0]), self._px(x, self.ylim[1])
        self._dashed(a, b, color)
        if label:
            self.legend.append((label, color, "dash"))

    def hline(self, y, color, label: str | None = None):
        a, b = self._px(self.xlim[0], y), self._px(self.xlim[1], y)
        self._dashed(a, b, color)
        if label:
            self.legend.append((label, color, "dash"))

    def point(self, x, y, color, label: str | None = None, radius: int = 6):
        p = self._px(x, y)
        self._dot(p, (255, 255, 255), radius + 2)
        self._dot(p, color, radius)
        if label:
            self.legend.append((label, color, "dot"))

    def render(self) -> Image.Image:
        """The plot with its legend in a strip below the axes: a legend inside the axes always covers
        some curve (a short history leaves no empty corner), and an entry hidden there is unreadable."""
        if self.s == 1:
            img = self.img
        else:
            img = self.img.resize((self.w, self.h), Image.Resampling.LANCZOS)
        if not self.legend:
            return img
        s, f = 2 if _scalable() else 1, _font(12 * (2 if _scalable() else 1))
        lh, gap = 20 * s, 22 * s
        widths = [int(_text_w(f, t)) + 40 * s for t, _, _ in self.legend]
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
        saved, self.d = self.d, d
        try:
            for r, items in enumerate(rows):
                cx = self.l * s
                yy = 4 * s + r * lh + lh / 2
                for i in items:
                    label, color, kind = self.legend[i]
                    if kind.startswith("line"):
                        d.line([(cx + 2 * s, yy), (cx + 26 * s, yy)], fill=color, width=2 * s)
                        if kind == "line+dot":
                            self._dot((cx + 14 * s, yy), color, 3)
                    elif kind == "dash":
                        self._dashed((cx + 2 * s, yy), (cx + 28 * s, yy), color)
                    else:
                        self._dot((cx + 14 * s, yy), color, 5)
                    if _scalable():
                        d.text((cx + 32 * s, yy), label, fill=INK, font=f, anchor="lm")
                    else:
                        d.text((cx + 32 * s, yy - 6), label, fill=INK, font=f)
                    cx += widths[i] + gap
        finally:
            self.d = saved
        if s > 1:
            strip = strip.resize((self.w, strip.height // s), Image.Resampling.LANCZOS)
        out = Image.new("RGB", (self.w, img.height + strip.height), BG)
        out.paste(img, (0, 0))
        out.paste(strip, (0, img.height))
        return out


# ---------------------------------------------------------------- reading artifacts

def _read_csv(work: Path, stage: str, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    path = work / stage / name
    if not path.is_file():
        raise _Missing(f"the {stage} stage has not run (no {path}).")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise _Missing(f"{path} could not be read: {e}") from None
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise _Missing(f"{path} lacks the column(s) {', '.join(lacking)}.")
    return df


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _unfinished(work: Path, stage: str) -> str:
    """A note when a stage's artifacts are there but its manifest is not (running, killed)."""
    if (work / stage / MANIFEST).is_file():
        return ""
    return (f"Note: the {stage} stage has no manifest (still running, or interrupted); "
            f"these are its partial artifacts.")


class _Photos:
    """Where each photo is (DATA/<folder>/<Image>), from the format/dedup tables when present."""

    def __init__(self, work: Path, data: Path | None):
        self.data = data
        self.folder: dict[str, str] = {}
        for stage, name in (("dedup", "images.csv"), ("format", "test.csv"), ("format", "new_whale.csv"),
                            ("format", "train.csv")):
            try:
                df = _read_csv(work, stage, name, ("Image", "folder"))
            except _Missing:
                continue
            self.folder.update(zip(df.Image.astype(str), df.folder.astype(str)))
        self.unreadable: set[str] = set()

    def path(self, name: str, default: str) -> Path | None:
        if self.data is None:
            return None
        first = self.folder.get(name, default)
        for folder in (first, "train", "test"):
            p = self.data / folder / name
            if p.is_file():
                return p
        return self.data / first / name

    def load(self, name: str, default: str, want: int):
        p = self.path(name, default)
        loaded = _load(p, want) if p is not None else None
        if loaded is None:
            self.unreadable.add(name)
        return loaded


def _boxes(work: Path) -> pd.DataFrame:
    parts = []
    for name, split in (("BB_TRAIN.csv", "train"), ("BB_TEST.csv", "test")):
        df = _read_csv(work, "boxes", name, ("Image", "x0", "y0", "x1", "y1"))
        if "method" not in df.columns:
            df["method"] = "unknown"
        df["split"] = split
        parts.append(df)
    out = pd.concat(parts, ignore_index=True)
    out["Image"] = out.Image.astype(str)
    out["method"] = out.method.fillna("unknown").astype(str)
    return out


def _box_of(boxes: dict, name: str):
    b = boxes.get(name)
    if b is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in b)
    except (TypeError, ValueError):
        return None
    if not all(map(np.isfinite, (x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


# ---------------------------------------------------------------- sections

class _Writer:
    def __init__(self, out: Path):
        self.out = out
        self.written: list[str] = []

    def png(self, name: str, img: Image.Image) -> str:
        with atomic_path(self.out / name) as tmp:
            img.save(tmp, format="PNG")
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared report from its readers
        self.written.append(name)
        return name


def _figure(name: str, caption: str) -> str:
    return (f'<figure><a href="{quote(name)}"><img src="{quote(name)}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _safe(method: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in method) or "unknown"


def section_boxes(work: Path, photos: _Photos, w: _Writer, sample: int, rng: np.random.Generator) -> str:
    boxes = _boxes(work)
    counts = boxes.groupby(["method", "split"]).size().unstack(fill_value=0)
    table = "".join(f"<tr><td>{html.escape(m)}</td><td>{int(r.get('train', 0))}</td><td>{int(r.get('test', 0))}</td></tr>"
                    for m, r in counts.iterrows())
    parts = [_unfinished(work, "boxes") and _note(_unfinished(work, "boxes")),
             f"<table><tr><th>method</th><th>train</th><th>test</th></tr>{table}</table>"]
    if photos.data is None:
        parts.append(_note("No data folder is known for this work folder: there are no photos to draw the boxes on."))
        return "\n".join(p for p in parts if p)
    methods = sorted(boxes.method.unique(), key=lambda m: (m == FULL_IMAGE, m))
    for method in methods:
        rows = boxes[boxes.method == method]
        if method == FULL_IMAGE:
            chosen = rows.iloc[:FULL_IMAGE_CAP]
            what = f"all {len(rows)}" if len(rows) <= FULL_IMAGE_CAP else f"the first {FULL_IMAGE_CAP} of {len(rows)}"
            title = f"Boxes: full-image fallbacks ({what})"
            columns = 6 if len(chosen) > 24 else 4
            if len(rows) > FULL_IMAGE_CAP:
                parts.append(_note(f"{len(rows)} photos fell back to the whole image; the first {FULL_IMAGE_CAP} are "
                                   f"drawn. The full list: rows with method {FULL_IMAGE} in boxes/BB_TRAIN.csv and "
                                   f"BB_TEST.csv."))
        else:
            # about half train, half test; the other split makes up a shortfall
            test, train = rows[rows.split == "test"], rows[rows.split == "train"]
            n_test = min(len(test), max(sample - len(train), sample // 2))
            n_train = min(len(train), sample - n_test)
            pick = lambda df, n: df.iloc[np.sort(rng.choice(len(df), size=n, replace=False))] if n else df.iloc[:0]
            chosen = pd.concat([pick(train, n_train), pick(test, n_test)])
            title = f"Boxes: method {method} ({len(chosen)} of {len(rows)}: {n_train} train, {n_test} test)"
            columns = 4
        tiles = []
        for r in chosen.itertuples():
            loaded = photos.load(r.Image, r.split, max(TILE))
            if loaded is None:
                continue
            img, sx, sy = loaded
            b = _box_of({r.Image: (r.x0, r.y0, r.x1, r.y1)}, r.Image)
            box = None if b is None else (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)
            fw, fh = round(img.width / sx), round(img.height / sy)
            tiles.append(_tile(img, [f"{r.Image} ({r.split})", f"{method}  {fw}x{fh}"], box=box))
        if not tiles:
            parts.append(_note(f"Method {method}: none of the {len(chosen)} chosen photos could be read."))
            continue
        per_page = FULL_IMAGE_PER_PAGE if method == FULL_IMAGE else len(tiles)
        pages = [tiles[i:i + per_page] for i in range(0, len(tiles), per_page)]
        for k, page in enumerate(pages, 1):
            ptitle = title + (f", sheet {k} of {len(pages)}" if len(pages) > 1 else "")
            suffix = f"_{k}" if k > 1 else ""
            name = w.png(f"boxes_{_safe(method)}{suffix}.png",
                         _grid(ptitle, page, columns, "red: the tail box, drawn just outside it"))
            parts.append(_figure(name, ptitle))
    return "\n".join(p for p in parts if p)


def section_dedup(work: Path, photos: _Photos, w: _Writer) -> str:
    rep = _read_csv(work, "dedup", "dedup_report.csv", ("group", "images", "ids"))
    parts = [_unfinished(work, "dedup") and _note(_unfinished(work, "dedup"))]
    if not len(rep):
        return "\n".join(p for p in parts + [_note("No duplicate groups were found.")] if p)
    conflict = rep.get("conflict", pd.Series(False, index=rep.index))
    rep = rep.assign(is_conflict=conflict.astype(str).str.strip().str.lower().isin(["true", "1", "yes"]))
    rep = rep.sort_values(["is_conflict", "group"], ascending=[False, True], kind="stable")
    n_conf = int(rep.is_conflict.sum())
    parts.append(f"<p>{len(rep)} duplicate groups, {n_conf} with conflicting ids"
                 + (f"; showing the first {DEDUP_GROUP_CAP} (conflicts first)" if len(rep) > DEDUP_GROUP_CAP else "")
                 + ".</p>")
    if photos.data is None:
        parts.append(_note("No data folder is known for this work folder: the groups are not drawn."))
        return "\n".join(p for p in parts if p)
    blocks = []
    for r in rep.iloc[:DEDUP_GROUP_CAP].itertuples():
        names = str(r.images).split()
        ids = str(r.ids).split()
        folders = str(getattr(r, "folders", "") or "").split()
        preferred = str(getattr(r, "preferred", "") or "")
        tiles = []
        for i, name in enumerate(names[:DEDUP_MEMBER_CAP]):
            folder = folders[i] if i < len(folders) else "train"
            ident = ids[i] if i < len(ids) else "-"
            loaded = photos.load(name, folder, max(TILE))
            kept = name == preferred
            lines = [name + ("  (preferred)" if kept else ""), f"{folder}  id {ident}"]
            tiles.append(_tile(loaded[0] if loaded else None, lines, frame=BLUE if kept else None,
                               placeholder=None if loaded else "unreadable",
                               line_colors={1: RED} if r.is_conflict and ident not in ("-", NEW_WHALE) else None))
        more = f" (+{len(names) - DEDUP_MEMBER_CAP} more)" if len(names) > DEDUP_MEMBER_CAP else ""
        row = _row(tiles)
        action = str(getattr(r, "action", "") or "")
        head = (f"group {r.group}: CONFLICT - " if r.is_conflict else f"group {r.group}: ") + action + more
        banner = _banner(head, max(row.width, 600), fill=(255, 225, 225) if r.is_conflict else (236, 240, 248),
                         color=RED if r.is_conflict else INK)
        block = Image.new("RGB", (banner.width, banner.height + 4 + row.height), BG)
        block.paste(banner, (0, 0))
        block.paste(row, (0, banner.height + 4))
        blocks.append(block)
    pages = [blocks[i:i + DEDUP_GROUPS_PER_PAGE] for i in range(0, len(blocks), DEDUP_GROUPS_PER_PAGE)]
    for k, page in enumerate(pages, 1):
        title = f"Duplicate groups, page {k} of {len(pages)}"
        name = w.png(f"dedup_{k}.png", _page(title, page, "blue frame: the preferred (kept) photo; "
                                                          "red id: a conflicting id"))
        parts.append(_figure(name, title))
    return "\n".join(p for p in parts if p)


def _best_epoch(work: Path, hist: pd.DataFrame) -> tuple[int, str] | None:
    """(1-based best epoch, the metric it is best in): the train manifest's, else early stopping's rule
    (first maximum of val_accuracy, else of accuracy; for a loss-only history the first minimum)."""
    m = _read_json(work / "train" / MANIFEST) or {}
    counts = m.get("counts", {}) if isinstance(m.get("counts"), dict) else {}
    monitor = next((c for c in ("val_accuracy", "accuracy", "val_loss", "loss")
                    if c in hist.columns and np.isfinite(hist[c].to_numpy(float)).any()), None)
    if monitor is None:
        return None
    best = counts.get("best_epoch")
    if isinstance(best, int) and 1 <= best <= len(hist):
        return best, monitor
    v = hist[monitor].to_numpy(float)
    v = np.where(np.isfinite(v), v, -np.inf if "accuracy" in monitor else np.inf)
    return int(np.argmax(v) if "accuracy" in monitor else np.argmin(v)) + 1, monitor


def section_training(work: Path, w: _Writer) -> str:
    hist = _read_csv(work, "train", "history.csv", ())
    if not len(hist):
        raise _Missing(f"{work / 'train' / 'history.csv'} has no epochs yet.")
    for c in hist.columns:
        hist[c] = pd.to_numeric(hist[c], errors="coerce")
    epochs = (hist["epoch"].to_numpy(float) + 1) if "epoch" in hist.columns else np.arange(1, len(hist) + 1, dtype=float)
    best = _best_epoch(work, hist)
    parts = [_unfinished(work, "train") and _note(_unfinished(work, "train"))]
    panels = []
    for metric, ylabel in (("loss", "loss"), ("accuracy", "accuracy")):
        cols = [c for c in (metric, f"val_{metric}") if c in hist.columns and np.isfinite(hist[c].to_numpy(float)).any()]
        if not cols:
            parts.append(_note(f"history.csv has no {metric} column: no {metric} panel."))
            continue
        vals = np.concatenate([hist[c].to_numpy(float) for c in cols])
        ylim = (0.0, max(1.0, float(np.nanmax(vals[np.isfinite(vals)]))) * 1.04) if metric == "accuracy" \
            else _axis_range(vals, floor=0.0)
        xlim = (min(epochs) - 0.5, max(epochs) + 0.5) if len(epochs) < 4 else (min(epochs), max(epochs))
        p = _Plot(f"Training {metric}", "epoch", ylabel, xlim, ylim, integer_x=True)
        if best is not None:
            p.vline(best[0], GREY, f"best epoch {best[0]} ({best[1]})")
        p.line(epochs, hist[metric] if metric in cols else [], BLUE, f"train {metric}" if metric in cols else None,
               markers=len(epochs) <= 40)
        if f"val_{metric}" in cols:
            p.line(epochs, hist[f"val_{metric}"], ORANGE, f"validation {metric}", markers=len(epochs) <= 40)
            if best is not None:
                p.point(best[0], float(hist[f"val_{metric}"].iloc[best[0] - 1]), ORANGE)
        elif best is not None and metric in cols:
            p.point(best[0], float(hist[metric].iloc[best[0] - 1]), BLUE)
        panels.append(p.render())
    if not panels:
        raise _Missing("history.csv has neither loss nor accuracy columns.")
    if not any(c.startswith("val_") for c in hist.columns):
        parts.append(_note("No validation columns in history.csv (no validation data): training curves only."))
    title = f"Training curves ({len(hist)} epochs" + (f", best epoch {best[0]} by {best[1]})" if best else ")")
    name = w.png("training_curves.png", _page(title, [_row(panels, gap=12)]))
    parts.append(_figure(name, title))
    return "\n".join(p for p in parts if p)


def section_threshold(work: Path, w: _Writer) -> str:
    sweep = _read_csv(work, "evaluate", "threshold_sweep.csv", ("threshold", "map5"))
    sweep = sweep.apply(pd.to_numeric, errors="coerce").dropna(subset=["threshold", "map5"]).sort_values("threshold")
    if not len(sweep):
        raise _Missing(f"{work / 'evaluate' / 'threshold_sweep.csv'} has no rows.")
    metrics = _read_json(work / "evaluate" / "metrics.json") or {}
    num = lambda k: float(metrics[k]) if isinstance(metrics.get(k), (int, float)) else None
    thr, map5, base = num("threshold"), num("map5"), num("all_new_whale_map5")
    bthr, bmap5 = num("best_threshold"), num("best_map5")
    tuned = (_read_json(work / "tuned_threshold.json") or {}).get("threshold")
    parts = [_unfinished(work, "evaluate") and _note(_unfinished(work, "evaluate"))]
    if not metrics:
        parts.append(_note("evaluate/metrics.json is missing: the configured threshold and baseline are not marked."))
    ys = list(sweep.map5) + [v for v in (map5, base, bmap5) if v is not None]
    ylim = (0.0, min(1.0, max(ys) * 1.15 + 0.02) if max(ys) > 0 else 1.0)
    xlim = (min(0.0, float(sweep.threshold.min())), max(1.0, float(sweep.threshold.max())))
    p = _Plot("Open-set MAP@5 vs new_whale threshold (validation)", "new_whale threshold", "MAP@5", xlim, ylim,
              size=(900, 500))
    if base is not None:
        p.hline(base, GREY, f"all new_whale baseline {base:.3f}")
    p.line(sweep.threshold, sweep.map5, BLUE, "MAP@5", markers=len(sweep) <= 30)
    if thr is not None:
        at = map5 if map5 is not None else float(np.interp(thr, sweep.threshold, sweep.map5))
        p.vline(thr, RED, f"configured threshold {thr:.3f}: MAP@5 {at:.3f}")
        p.point(thr, at, RED)
    if bthr is not None and bmap5 is not None:
        p.point(bthr, bmap5, GREEN, f"best threshold {bthr:.2f}: MAP@5 {bmap5:.3f}")
    if isinstance(tuned, (int, float)) and (thr is None or abs(tuned - thr) > 1e-9):
        p.vline(float(tuned), PURPLE, f"tuned threshold {tuned:.2f} (predict uses it)")
    name = w.png("threshold_map5.png", p.render())
    keys = [("map5", "MAP@5"), ("top1", "top-1"), ("threshold", "threshold"), ("all_new_whale_map5", "all-new_whale MAP@5"),
            ("best_threshold", "best threshold"), ("best_map5", "best MAP@5"), ("images", "images"),
            ("new_whale_share", "new_whale share")]
    rows = "".join(f"<tr><td>{label}</td><td>{html.escape(str(metrics[k]))}</td></tr>" for k, label in keys if k in metrics)
    if rows:
        parts.append(f"<table>{rows}</table>")
    parts.append(_figure(name, "MAP@5 against the new_whale threshold"))
    return "\n".join(p for p in parts if p)


def section_predictions(work: Path, data: Path | None, photos: _Photos, w: _Writer, sample: int,
                        rng: np.random.Generator) -> str:
    preds = _read_csv(work, "predict", "predictions.csv", ("Image", "Id"))
    if photos.data is None:
        raise _Missing("no data folder is known for this work folder, so there are no photos to show.")
    parts = [_unfinished(work, "predict") and _note(_unfinished(work, "predict"))]
    try:
        train = _read_csv(work, "format", "train.csv", ("Image", "Id"))
    except _Missing as e:
        train = pd.DataFrame(columns=["Image", "Id"])
        parts.append(_note(f"No training photos to show for the predicted ids: {e}"))
    box_train, box_test, full_train = {}, {}, set()
    for name, target in (("BB_TRAIN.csv", box_train), ("BB_TEST.csv", box_test)):
        try:
            df = _read_csv(work, "boxes", name, ("Image", "x0", "y0", "x1", "y1"))
        except _Missing:
            parts.append(_note(f"No {name}: photos are shown uncropped."))
            continue
        target.update({str(i): b for i, *b in zip(df.Image, df.x0, df.y0, df.x1, df.y1)})
        if target is box_train and "method" in df.columns:
            full_train = set(df.Image[df.method == FULL_IMAGE].astype(str))
    # one training photo per id: the first in format/train.csv with a detected (not full-image) box
    train = train.assign(_full=train.Image.isin(full_train)).sort_values("_full", kind="stable")
    photo_of = dict(train.drop_duplicates("Id")[["Id", "Image"]].itertuples(index=False, name=None))
    truth = {}
    if data is not None and (data / "solution.csv").is_file():  # synthetic sets carry their answers
        try:
            sol = pd.read_csv(data / "solution.csv")
            truth = dict(zip(sol.Image.astype(str), sol.Id.astype(str)))
        except (pd.errors.ParserError, AttributeError, ValueError):
            truth = {}
    n = min(sample, len(preds))
    chosen = preds.iloc[np.sort(rng.choice(len(preds), size=n, replace=False))] if n else preds.iloc[:0]
    rows = []
    want = 2 * max(TILE)
    for r in chosen.itertuples():
        image = str(r.Image)
        loaded = photos.load(image, "test", want)
        if loaded is None:
            continue
        score = getattr(r, "top_score", None)
        source = getattr(r, "source", "")
        info = f"{source}" + (f", top score {float(score):.3f}" if isinstance(score, (int, float)) and np.isfinite(score) else "")
        t = truth.get(image)
        q = _tile(_crop(loaded, _box_of(box_test, image)), [f"query {image}", info, f"truth {t}" if t else ""],
                  frame=INK, nlines=3)
        tiles = [q]
        shown = 0
        for k, ident in enumerate(str(r.Id).split(), 1):
            if shown == TOP_SHOWN:
                break  # the top-3 known ids' photos, and new_whale at its rank when it comes before them
            shown += ident != NEW_WHALE
            hit = t is not None and ident == t
            frame = GREEN if hit else None
            mark = "  = truth" if hit else ""
            if ident == NEW_WHALE:
                tiles.append(_tile(None, [f"#{k} new_whale{mark}", "no known individual"], placeholder=NEW_WHALE,
                                   frame=frame, line_colors={0: GREEN} if hit else None, nlines=3))
                continue
            photo = photo_of.get(ident)
            got = photos.load(photo, "train", want) if photo else None
            if got is None:
                tiles.append(_tile(None, [f"#{k} {ident}{mark}", "no training photo" if not photo else f"{photo} unreadable"],
                                   placeholder="no photo", frame=frame, nlines=3))
                continue
            tiles.append(_tile(_crop(got, _box_of(box_train, photo)), [f"#{k} {ident}{mark}", f"train photo {photo}"],
                               frame=frame, line_colors={0: GREEN} if hit else None, nlines=3))
        rows.append(_row(tiles, sep_after=0))
    if not rows:
        raise _Missing(f"none of the {n} chosen test photos could be read.")
    title = f"Test predictions: {len(rows)} of {len(preds)} photos, top-{TOP_SHOWN} ids"
    sub = "query cropped to its box | #rank in the submission: one training photo per predicted id, cropped to its box" + \
          ("; green: the true id (solution.csv)" if truth else "")
    name = w.png("predictions.png", _page(title, rows, sub))
    parts.append(_figure(name, title))
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------- the page

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1700px;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em} .note{color:#a33}
figure{margin:.8em 0} img{max-width:100%;border:1px solid #ccc} figcaption{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:2px 10px;text-align:left}
nav a{margin-right:1em} .meta{color:#666}"""


def _data_of(work: Path) -> Path | None:
    rec = _read_json(work / "whaleid.json") or {}
    return Path(rec["data"]) if rec.get("data") else None


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def write_report(work: Path, data: Path | None = None, out: Path | None = None, sample: int = 12, seed: int = 0) -> Path:
    """Write PNGs and index.html for the artifacts in `work` into `out` (default WORK/report/);
    return the index path. `data` defaults to the data folder recorded in WORK/whaleid.json.
    `sample` photos per box method and test predictions shown, chosen with `seed`."""
    work = Path(work)
    if not work.is_dir():
        raise ValueError(f"work folder {work} not found")
    if sample < 1:
        raise ValueError(f"sample must be at least 1, not {sample}")
    data = Path(data) if data is not None else _data_of(work)
    if data is not None and not data.is_dir():
        data = None  # photos unavailable; sections that need them say so
    out = Path(out) if out is not None else work / "report"
    if data is not None and _inside(out, data):
        raise ValueError(f"the report folder {out} is inside the data folder {data}; whaleid never writes there")
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out)
    photos = _Photos(work, data)
    sections = [
        ("boxes", "1. Tail boxes", lambda: section_boxes(work, photos, w, sample, np.random.default_rng([seed, 1]))),
        ("duplicates", "2. Duplicate groups", lambda: section_dedup(work, photos, w)),
        ("training", "3. Training curves", lambda: section_training(work, w)),
        ("threshold", "4. MAP@5 vs new_whale threshold", lambda: section_threshold(work, w)),
        ("predictions", "5. Test predictions",
         lambda: section_predictions(work, data, photos, w, sample, np.random.default_rng([seed, 5]))),
    ]
    body = []
    for key, title, build in sections:
        try:
            content = build()
        except _Missing as e:
            content = _note(f"Not shown: {e}")
        body.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{content}\n</section>')
    if photos.unreadable:
        shown = ", ".join(sorted(photos.unreadable)[:20]) + (" ..." if len(photos.unreadable) > 20 else "")
        body.append(_note(f"{len(photos.unreadable)} photo(s) could not be read and were left out: {shown}"))
    nav = " ".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, _ in sections)
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>whaleid report: '
            f"{html.escape(str(work))}</title><style>{CSS}</style></head><body>\n<h1>whaleid report</h1>\n"
            f'<p class="meta">work {html.escape(str(work.resolve()))} &middot; data '
            f"{html.escape(str(data.resolve()) if data else 'unknown')} &middot; written "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} &middot; sample {sample}, seed {seed}</p>\n"
            f"<nav>{nav}</nav>\n" + "\n".join(body) + "\n</body></html>\n")
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_bytes(page.encode("utf-8"))
        os.chmod(tmp, 0o644)
    for old in out.glob("*.png"):  # PNGs of an earlier report whose section is gone now
        if old.name not in w.written and old.name.startswith(PREFIXES):
            old.unlink()
    return index
