"""The report's predictions sheet: test photos with the ids predict answered, each shown by one
training photo (or, when predict re-ranked, by its best matching photo with the inliers joined)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from whaleid.data.tables import NEW_WHALE
from whaleid.report import match_pairs
from whaleid.report.drawing import GREEN, INK
from whaleid.report.sheets import (BOX_FILES, FULL_IMAGE, TILE, TOP_SHOWN, Missing, _box_table, _crop, _sample, _tile,
                                   _valid_box, figure, join_html, note, read_table, sheet, tile_row, unfinished_note)

if TYPE_CHECKING:
    from whaleid.report.page import Photos, Writer


def section_predictions(work: Path, data: Path | None, photos: Photos, w: Writer, sample: int,
                        rng: np.random.Generator) -> str:
    preds = read_table(work, "predict", "predictions.csv", ("Image", "Id"))
    if photos.data is None:
        raise Missing("no data folder is known for this work folder, so there are no photos to show.")
    parts = [unfinished_note(work, "predict")]
    try:
        train = read_table(work, "format", "train.csv", ("Image", "Id"))
    except Missing as e:
        train = pd.DataFrame(columns=["Image", "Id"])
        parts.append(note(f"No training photos to show for the predicted ids: {e}"))
    box_of, pairs = {"train": {}, "test": {}}, match_pairs.for_work(work, data)
    full_train = set()
    for name, split in BOX_FILES:
        try:
            df = _box_table(work, name, split)
        except Missing:
            parts.append(note(f"No {name}: photos are shown uncropped."))
            continue
        box_of[split] = dict(zip(df.Image, zip(df.x0, df.y0, df.x1, df.y1)))
        if split == "train":
            full_train = set(df.Image[df.method == FULL_IMAGE])
    # one training photo per id: the first in format/train.csv with a detected (not full-image) box
    train = train.assign(_full=train.Image.isin(full_train)).sort_values("_full", kind="stable")
    photo_of = dict(train.drop_duplicates("Id")[["Id", "Image"]].itertuples(index=False, name=None))
    truth = solution(data)
    n = min(sample, len(preds))
    rows = []
    want = 2 * max(TILE)
    for r in _sample(preds, n, rng).itertuples():
        image = str(r.Image)
        loaded = photos.load(image, "test", want)
        if loaded is None:
            continue
        score = getattr(r, "top_score", None)
        source = getattr(r, "source", "")
        info = f"{source}" + (f", top score {float(score):.3f}" if isinstance(score, (int, float)) and np.isfinite(score) else "")
        t = truth.get(image)
        q = _tile(_crop(loaded, _valid_box(box_of["test"].get(image))),
                  [f"query {image}", info, f"truth {t}" if t else ""], frame=INK, nlines=3)
        tiles = [q] + candidate_tiles(str(r.Id), image, t, pairs, photo_of, photos, box_of, want)
        rows.append(tile_row(tiles, sep_after=0))
    if not rows:
        raise Missing(f"none of the {n} chosen test photos could be read.")
    title = f"Test predictions: {len(rows)} of {len(preds)} photos, top-{TOP_SHOWN} ids"
    sub = "query cropped to its box | #rank in the submission: one training photo per predicted id, cropped to its box" + \
          ("; green: the true id (solution.csv)" if truth else "")
    name = w.png("predictions.png", sheet(title, rows, sub))
    parts.append(figure(name, title))
    return join_html(parts)


def solution(data: Path | None) -> dict[str, str]:
    """Image -> true id, from the data folder's solution.csv (synthetic and imported sets carry their answers)."""
    if data is None or not (data / "solution.csv").is_file():
        return {}
    try:
        sol = pd.read_csv(data / "solution.csv")
        return dict(zip(sol.Image.astype(str), sol.Id.astype(str)))
    except (pd.errors.ParserError, AttributeError, ValueError):
        return {}


def candidate_tiles(answer: str, image: str, t: str | None, pairs, photo_of: dict, photos: Photos, box_of: dict,
                    want: int) -> list:
    """The tiles of one test photo's answer: the top-3 known ids' photos (or their matched pair when
    predict re-ranked), and new_whale at its rank when it comes before them."""
    tiles = []
    shown = 0
    for k, ident in enumerate(answer.split(), 1):
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
        drawn = pairs.draw(image, ident) if pairs else None  # re-ranked: the inliers with its best photo
        if drawn is not None:
            tiles.append(_tile(drawn[0], [f"#{k} {ident}{mark}", drawn[1]], frame=frame, nlines=3,
                               size=(2 * TILE[0], TILE[1]), line_colors={0: GREEN} if hit else None))
            continue
        photo = photo_of.get(ident)
        got = photos.load(photo, "train", want) if photo else None
        if got is None:
            tiles.append(_tile(None, [f"#{k} {ident}{mark}", "no training photo" if not photo else f"{photo} unreadable"],
                               placeholder="no photo", frame=frame, nlines=3))
            continue
        tiles.append(_tile(_crop(got, _valid_box(box_of["train"].get(photo))),
                           [f"#{k} {ident}{mark}", f"train photo {photo}"],
                           frame=frame, line_colors={0: GREEN} if hit else None, nlines=3))
    return tiles
