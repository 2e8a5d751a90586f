"""The report's photo contact sheets (sections 1 and 2 of whaleid.report.page: tail boxes,
duplicate groups; the test predictions' sheet is predictions.py), and the artifact reading and HTML pieces all sections share.

Kept apart from page.py (the page, its two plot sections, and the Photos and Writer it hands each
section) so neither module is long; the shared pieces live here because page.py imports this module,
not the other way round. A section that cannot be drawn raises Missing with the line the page shows.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from whaleid.report.drawing import BG, BLUE, GREY, INK, PANEL, RED, fit, font, scalable
from whaleid.pipeline.stage import MANIFEST
from whaleid.data import images
from whaleid.data.tables import NEW_WHALE

if TYPE_CHECKING:  # annotations only: page.py imports this module
    from whaleid.report.page import Photos, Writer

FULL_IMAGE = "full-image"    # the box method of a photo whose tail was not found (boxes.py)
SUBJECT = "subject"          # boxes.detector = subject (preprocess/subject_box.py): methods subject, subject-contrast
SUBJECT_NOTES = {
    "subject": "Method subject: the animal, where the pretrained network's class activation over ImageNet's animal "
               "classes is at least 0.3 of its peak, widened a little (preprocess/subject_box.py).",
    "subject-contrast": "Method subject-contrast: the network saw no animal (too little of its probability on "
                        "ImageNet's animal classes, or a flat activation map), so the box holds the colours most "
                        "unlike the photo's border."}
FULL_IMAGE_PER_PAGE = 48     # full-image fallbacks per sheet (6 columns)
FULL_IMAGE_CAP = 960         # fallbacks shown in all (20 sheets): every one, unless detection failed wholesale
DEDUP_GROUP_CAP = 48         # duplicate groups shown (conflicts first)
DEDUP_MEMBER_CAP = 6         # photos shown per group
DEDUP_GROUPS_PER_PAGE = 12
TOP_SHOWN = 3                # predicted known ids (with photos) shown per query
TILE = (240, 170)            # image area of a tile, pixels
CROP_MARGIN = 0.05           # context around a box when cropping to it
BOX_FILES = (("BB_TRAIN.csv", "train"), ("BB_TEST.csv", "test"))
BOX_COLUMNS = ("Image", "x0", "y0", "x1", "y1")


class Missing(Exception):
    """An artifact a section needs is absent or unusable; the message is the section's note."""


# ---------------------------------------------------------------- reading artifacts, section HTML

def read_table(work: Path, stage: str, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    path = work / stage / name
    if not path.is_file():
        raise Missing(f"the {stage} stage has not run (no {path}).")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise Missing(f"{path} could not be read: {e}") from None
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise Missing(f"{path} lacks the column(s) {', '.join(lacking)}.")
    return df


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def unfinished_note(work: Path, stage: str) -> str:
    """A note when a stage's artifacts are there but its manifest is not (running, killed); else ""."""
    if (work / stage / MANIFEST).is_file():
        return ""
    return note(f"Note: the {stage} stage has no manifest (still running, or interrupted); "
                f"these are its partial artifacts.")


def figure(name: str, caption: str) -> str:
    return (f'<figure><a href="{quote(name)}"><img src="{quote(name)}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def join_html(parts: list[str]) -> str:
    """A section's HTML: its non-empty parts, one a line."""
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------- photos, tiles and sheets

def _box_table(work: Path, name: str, split: str) -> pd.DataFrame:
    """boxes/<name> with Image and method as text (method "unknown" when absent) and a split column."""
    df = read_table(work, "boxes", name, BOX_COLUMNS)
    df["Image"] = df.Image.astype(str)
    df["method"] = df.method.fillna("unknown").astype(str) if "method" in df.columns else "unknown"
    df["split"] = split
    return df


def _valid_box(b):
    """(x0, y0, x1, y1) as floats, or None unless finite and non-empty."""
    if b is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in b)
    except (TypeError, ValueError):
        return None
    if not all(map(np.isfinite, (x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _scaled(box, sx: float, sy: float):
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _crop(loaded, box) -> Image.Image:
    """The decoded photo cropped to `box` (file pixels, x1/y1 exclusive) plus a small margin."""
    img, sx, sy = loaded
    if box is None:
        return img
    x0, y0, x1, y1 = _scaled(box, sx, sy)
    mx, my = (x1 - x0) * CROP_MARGIN, (y1 - y0) * CROP_MARGIN
    c = (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(img.width, int(math.ceil(x1 + mx))),
         min(img.height, int(math.ceil(y1 + my))))
    if c[2] - c[0] < 2 or c[3] - c[1] < 2:
        return img
    return img.crop(c)


def _tile(img: Image.Image | None, lines: list[str], *, box=None, frame=None, placeholder: str | None = None,
          nlines: int = 2, size=TILE, line_colors=None) -> Image.Image:
    """A labelled tile: `img` fitted (letterboxed) into `size`, an optional box (in `img` pixels) drawn
    on it, a coloured frame, and `nlines` lines of text below. Without img, a blank tile saying
    `placeholder`."""
    w, h = size
    fnt = font(13)
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
        big = font(20)
        text = fit(big, placeholder, w - 10)
        if scalable():
            d.text((w / 2, h / 2), text, fill=GREY, font=big, anchor="mm")
        else:
            d.text((8, h / 2 - 6), text, fill=GREY, font=big)
    if frame is not None:
        d.rectangle([0, 0, w - 1, h - 1], outline=frame, width=4)
    for i, line in enumerate(lines[:nlines]):
        color = (line_colors or {}).get(i, INK)
        d.text((3, h + 4 + i * lh), fit(fnt, line, w - 6), fill=color, font=fnt)
    return tile


def tile_row(tiles: list[Image.Image], gap: int = 8, sep_after: int | None = None) -> Image.Image:
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
    fnt = font(size)
    b = Image.new("RGB", (width, size + 10), fill)
    ImageDraw.Draw(b).text((6, 4), fit(fnt, text, width - 12), fill=color, font=fnt)
    return b


def sheet(title: str, blocks: list[Image.Image], subtitle: str = "", min_width: int = 640, gap: int = 10,
          pad: int = 12) -> Image.Image:
    """One PNG's image: blocks stacked vertically under a title."""
    width = max([min_width] + [b.width + 2 * pad for b in blocks])
    tfont, sfont = font(20), font(13)
    head = 34 + (20 if subtitle else 0)
    height = head + sum(b.height for b in blocks) + gap * max(0, len(blocks) - 1) + 2 * pad
    page = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(page)
    d.text((pad, 10), fit(tfont, title, width - 2 * pad), fill=INK, font=tfont)
    if subtitle:
        d.text((pad, 36), fit(sfont, subtitle, width - 2 * pad), fill=GREY, font=sfont)
    y = head + pad
    for b in blocks:
        page.paste(b, (pad, y))
        y += b.height + gap
    return page


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _sample(df: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n rows chosen at random, in table order."""
    return df.iloc[np.sort(rng.choice(len(df), size=n, replace=False))] if n else df.iloc[:0]


def _safe(method: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in method) or "unknown"


# ---------------------------------------------------------------- sections

def section_boxes(work: Path, photos: Photos, w: Writer, sample: int, rng: np.random.Generator) -> str:
    boxes = pd.concat([_box_table(work, name, split) for name, split in BOX_FILES], ignore_index=True)
    counts = boxes.groupby(["method", "split"]).size().unstack(fill_value=0)
    table = "".join(f"<tr><td>{html.escape(m)}</td><td>{int(r.get('train', 0))}</td><td>{int(r.get('test', 0))}</td></tr>"
                    for m, r in counts.iterrows())
    parts = [unfinished_note(work, "boxes"), f"<table><tr><th>method</th><th>train</th><th>test</th></tr>{table}</table>"]
    if photos.data is None:
        parts.append(note("No data folder is known for this work folder: there are no photos to draw the boxes on."))
        return join_html(parts)
    for method in sorted(boxes.method.unique(), key=lambda m: (m == FULL_IMAGE, m)):
        rows = boxes[boxes.method == method]
        if method == FULL_IMAGE:
            chosen = rows.iloc[:FULL_IMAGE_CAP]
            what = f"all {len(rows)}" if len(rows) <= FULL_IMAGE_CAP else f"the first {FULL_IMAGE_CAP} of {len(rows)}"
            title = f"Boxes: full-image fallbacks ({what})"
            columns = 6 if len(chosen) > 24 else 4
            if len(rows) > FULL_IMAGE_CAP:
                parts.append(note(f"{len(rows)} photos fell back to the whole image; the first {FULL_IMAGE_CAP} are "
                                  f"drawn. The full list: rows with method {FULL_IMAGE} in boxes/BB_TRAIN.csv and "
                                  f"BB_TEST.csv."))
        else:
            # about half train, half test; the other split makes up a shortfall
            test, train = rows[rows.split == "test"], rows[rows.split == "train"]
            n_test = min(len(test), max(sample - len(train), sample // 2))
            n_train = min(len(train), sample - n_test)
            chosen = pd.concat([_sample(train, n_train, rng), _sample(test, n_test, rng)])
            title = f"Boxes: method {method} ({len(chosen)} of {len(rows)}: {n_train} train, {n_test} test)"
            columns = 4
        tiles = []
        for r in chosen.itertuples():
            loaded = photos.load(r.Image, r.split, max(TILE))
            if loaded is None:
                continue
            img, sx, sy = loaded
            b = _valid_box((r.x0, r.y0, r.x1, r.y1))
            box = None if b is None else _scaled(b, sx, sy)
            fw, fh = round(img.width / sx), round(img.height / sy)
            tiles.append(_tile(img, [f"{r.Image} ({r.split})", f"{method}  {fw}x{fh}"], box=box))
        if method.startswith(SUBJECT):
            parts.append(note(SUBJECT_NOTES[method]))
        if not tiles:
            parts.append(note(f"Method {method}: none of the {len(chosen)} chosen photos could be read."))
            continue
        pages = _chunks(tiles, FULL_IMAGE_PER_PAGE if method == FULL_IMAGE else len(tiles))
        for k, page in enumerate(pages, 1):
            ptitle = title + (f", sheet {k} of {len(pages)}" if len(pages) > 1 else "")
            suffix = f"_{k}" if k > 1 else ""
            rows_of_tiles = [tile_row(t) for t in _chunks(page, columns)]
            what = "the animal's box (boxes.detector = subject)" if method.startswith(SUBJECT) else "the tail box"
            name = w.png(f"boxes_{_safe(method)}{suffix}.png",
                         sheet(ptitle, rows_of_tiles, f"red: {what}, drawn just outside it"))
            parts.append(figure(name, ptitle))
    parts.append(section_masks(work, photos, w, boxes, sample, rng))
    return join_html(parts)


def section_dedup(work: Path, photos: Photos, w: Writer) -> str:
    rep = read_table(work, "dedup", "dedup_report.csv", ("group", "images", "ids"))
    parts = [unfinished_note(work, "dedup")]
    if not len(rep):
        return join_html(parts + [note("No duplicate groups were found.")])
    conflict = rep.get("conflict", pd.Series(False, index=rep.index))
    rep = rep.assign(is_conflict=conflict.astype(str).str.strip().str.lower().isin(["true", "1", "yes"]))
    rep = rep.sort_values(["is_conflict", "group"], ascending=[False, True], kind="stable")
    n_conf = int(rep.is_conflict.sum())
    parts.append(f"<p>{len(rep)} duplicate groups, {n_conf} with conflicting ids"
                 + (f"; showing the first {DEDUP_GROUP_CAP} (conflicts first)" if len(rep) > DEDUP_GROUP_CAP else "")
                 + ".</p>")
    if photos.data is None:
        parts.append(note("No data folder is known for this work folder: the groups are not drawn."))
        return join_html(parts)
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
        row = tile_row(tiles)
        action = str(getattr(r, "action", "") or "")
        head = (f"group {r.group}: CONFLICT - " if r.is_conflict else f"group {r.group}: ") + action + more
        banner = _banner(head, max(row.width, 600), fill=(255, 225, 225) if r.is_conflict else (236, 240, 248),
                         color=RED if r.is_conflict else INK)
        block = Image.new("RGB", (banner.width, banner.height + 4 + row.height), BG)
        block.paste(banner, (0, 0))
        block.paste(row, (0, banner.height + 4))
        blocks.append(block)
    pages = _chunks(blocks, DEDUP_GROUPS_PER_PAGE)
    for k, page in enumerate(pages, 1):
        title = f"Duplicate groups, page {k} of {len(pages)}"
        name = w.png(f"dedup_{k}.png", sheet(title, page, "blue frame: the preferred (kept) photo; "
                                                          "red id: a conflicting id"))
        parts.append(figure(name, title))
    return join_html(parts)


def section_masks(work: Path, photos: Photos, w: Writer, boxes: pd.DataFrame, sample: int,
                  rng: np.random.Generator) -> str:
    """keypoints.mask: the animal's mask of `sample` training photos, the rest of each crop darkened (the
    keypoints stage's own crops and masks); nothing when the keypoints were not taken on masks."""
    from whaleid.preprocess import keypoints, masks
    path = work / "keypoints" / "keypoints.npz"
    if not path.is_file() or photos.data is None:
        return ""
    store = keypoints.Store(path)
    named = [n for n in store.index if n in set(boxes.Image)]
    if not named or store.mask(named[0]) is None:
        return ""
    margin = json.loads((work / "keypoints" / "manifest.json").read_text())["settings"].get("augment.margin", 0.0)
    chosen = [named[i] for i in sorted(rng.choice(len(named), size=min(sample, len(named)), replace=False))]
    by_image = boxes.drop_duplicates("Image").set_index("Image")
    tiles = []
    for image in chosen:
        b = by_image.loc[image]
        try:
            rgb = keypoints.crop_rgb(photos.path(image, "train"), (int(b.x0), int(b.y0), int(b.x1), int(b.y1)),
                                     margin, max(TILE))
        except images.BadImage:
            photos.unreadable.add(image)
            continue
        m = store.mask(image)
        on = masks.resized(m, rgb.shape[1], rgb.shape[0])[..., None]
        shown = np.where(on, rgb, (rgb * 0.3).astype(np.uint8))
        tiles.append(_tile(Image.fromarray(shown), [image, f"mask {m.mean():.0%} of the crop"]))
    if not tiles:
        return ""
    title = f"Animal masks (keypoints.mask): {len(tiles)} training photos"
    name = w.png("boxes_masks.png", sheet(title, [tile_row(t) for t in _chunks(tiles, 4)],
                                          "darkened: off the animal's mask, where no keypoint is taken"))
    return figure(name, title)

