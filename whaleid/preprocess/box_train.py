"""Fitting and honestly measuring the learned tail box of box_head.py: the labelled photos, their
augmented copies, the ridge fit as a sum of per-photo statistics, and cross-validation (every photo
scored by weights fitted without it and without its copies).

    scripts/fit_box_head.py   fit on every labelled photo -> box_head_weights.py (shipped)
    scripts/bench_boxes.py    leave-one-out IoU per photo, and per detector
    tests/test_box_head.py    the same leave-one-out, asserted
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from whaleid.preprocess import box_head, boxes
from whaleid.preprocess.box_head import AUGMENT_COPIES, DESIGN, RIDGE_ALPHA, Weights, design, feature_maps


# ---------------------------------------------------------------- the fit

def cell_targets(box, h: int, w: int) -> np.ndarray:
    """Fraction of each cell of an h x w grid over the unit square covered by `box` (relative x0,y0,x1,y1)."""
    xe, ye = np.linspace(0, 1, w + 1), np.linspace(0, 1, h + 1)
    fx = np.clip(np.minimum(xe[1:], box[2]) - np.maximum(xe[:-1], box[0]), 0, None) * w
    fy = np.clip(np.minimum(ye[1:], box[3]) - np.maximum(ye[:-1], box[1]), 0, None) * h
    return fy[:, None] * fx[None, :]


def mirror_map(maps: np.ndarray) -> np.ndarray:
    return maps[..., ::-1, :]


def mirror_box(box):
    return (1 - box[2], box[1], 1 - box[0], box[3])


def statistics(maps: np.ndarray, rel_boxes, parts=None) -> dict:
    """Sufficient statistics of a ridge fit of cell_targets on design(maps): counts and sums that add up
    over photos (so that leaving a photo out is a subtraction, not a refit over all the others)."""
    n, h, w, _ = maps.shape
    X = design(maps, parts or DESIGN).reshape(n * h * w, -1).astype(np.float64)
    y = np.concatenate([cell_targets(b, h, w).ravel() for b in rel_boxes])
    return {"parts": tuple(parts or DESIGN), "n": len(y), "x": X.sum(0), "xx": X.T @ X, "y": y.sum(), "xy": X.T @ y}


SUMS = ("n", "x", "xx", "y", "xy")


def combine(stats, sign=None) -> dict:
    """Statistics added up (sign +1) or taken out (-1): the fit without a photo is total - its own."""
    sign = sign or [1] * len(stats)
    out = {k: sum(s * st[k] for s, st in zip(sign, stats)) for k in SUMS}
    return {**out, "parts": stats[0]["parts"]}


def solve(st: dict, alpha: float = RIDGE_ALPHA) -> Weights:
    """Ridge regression on standardised features, penalty alpha per cell (alpha * number of cells),
    intercept free; returns (w, b) on the raw features."""
    n = st["n"]
    mu, ym = st["x"] / n, st["y"] / n
    cov = st["xx"] / n - np.outer(mu, mu)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None)) + 1e-6
    cxy = st["xy"] / n - mu * ym
    coef = np.linalg.solve(cov / np.outer(sd, sd) + alpha * np.eye(len(sd)), cxy / sd)
    wv = coef / sd
    return Weights(wv.astype(np.float32), float(ym - mu @ wv), st["parts"])


# ---------------------------------------------------------------- training photos

def sea_strip(rgb: np.ndarray, box) -> np.ndarray | None:
    """The photo's own sea or sky: the rows above or below its box (the taller), None if under 8% of it."""
    h = rgb.shape[0]
    y0, y1 = int(box[1] * h), int(np.ceil(box[3] * h))
    above, below = rgb[:y0], rgb[y1:]
    strip = above if len(above) > len(below) else below
    return strip if len(strip) >= max(4, 0.08 * h) else None


def augment(rgb: np.ndarray, box, rng: np.random.Generator, zoom_out: bool):
    """A training copy of a photo and its relative box: zoomed out into a canvas of the photo's own sea
    (a fluke that fills less of the photo than in the training set) or cropped closer (one that fills
    more, or is cut by the edge), mirrored half the time, lit differently, greyscale a quarter of the time."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    strip = sea_strip(rgb, box) if zoom_out else None
    if strip is not None:
        s = rng.uniform(0.4, 0.8)
        cw, ch = int(w / rng.uniform(s, 1.0)), int(h / rng.uniform(s, 1.0))
        cw, ch = max(cw, w), max(ch, h)
        canvas = cv2.resize(strip, (cw, ch), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        canvas += rng.normal(0, 4, canvas.shape).astype(np.float32)
        ox, oy = int(rng.integers(0, cw - w + 1)), int(rng.integers(0, ch - h + 1))
        alpha = np.zeros((h, w), np.float32)
        edge = max(2, int(0.04 * min(h, w)))
        alpha[edge:h - edge, edge:w - edge] = 1
        alpha = cv2.GaussianBlur(alpha, (0, 0), edge / 2)[..., None]
        region = canvas[oy:oy + h, ox:ox + w]
        canvas[oy:oy + h, ox:ox + w] = alpha * rgb + (1 - alpha) * region
        out, (x0, y0, x1, y1), (w, h) = canvas, (x0 + ox, y0 + oy, x1 + ox, y1 + oy), (cw, ch)
    else:
        bw, bh = x1 - x0, y1 - y0
        cx0, cy0 = rng.uniform(0, x0 + 0.15 * bw), rng.uniform(0, y0 + 0.15 * bh)
        cx1, cy1 = rng.uniform(x1 - 0.15 * bw, w), rng.uniform(y1 - 0.15 * bh, h)
        cx0, cy0, cx1, cy1 = int(cx0), int(cy0), max(int(cx0) + 8, int(np.ceil(cx1))), max(int(cy0) + 8, int(np.ceil(cy1)))
        out = rgb[cy0:cy1, cx0:cx1].astype(np.float32)
        x0, y0, x1, y1 = max(0, x0 - cx0), max(0, y0 - cy0), min(cx1 - cx0, x1 - cx0), min(cy1 - cy0, y1 - cy0)
        h, w = out.shape[:2]
    out = out * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25)
    if rng.random() < 0.25:
        out = np.repeat(out.mean(-1, keepdims=True), 3, -1)
    out = np.clip(out, 0, 255).astype(np.uint8)
    rel = (x0 / w, y0 / h, x1 / w, y1 / h)
    if rng.random() < 0.5:
        out, rel = np.ascontiguousarray(out[:, ::-1]), mirror_box(rel)
    return out, rel


def training_statistics(rgbs: list[np.ndarray], rel_boxes, copies: int = AUGMENT_COPIES, seed: int = 0,
                        parts=None) -> list[dict]:
    """Per photo: the statistics of it, its mirror image and `copies` augmented copies (alternately
    zoomed out and cropped), from its own pixels only (so a photo left out takes all of them along)."""
    rng = np.random.default_rng(seed)
    out = []
    for rgb, box in zip(rgbs, rel_boxes):
        views = [(rgb, tuple(box))] + [augment(rgb, box, rng, zoom_out=k % 2 == 0) for k in range(copies)]
        maps = feature_maps([v for v, _ in views])
        boxes_ = [b for _, b in views]
        maps = np.concatenate([maps[:1], mirror_map(maps[:1]), maps[1:]])
        boxes_ = [boxes_[0], mirror_box(boxes_[0])] + boxes_[1:]
        out.append({**statistics(maps, boxes_, parts), "map": maps[0]})
    return out


# ---------------------------------------------------------------- honest measurement

class Labelled(NamedTuple):
    name: str
    rgb: np.ndarray          # decoded as the boxes stage decodes it (boxes.decode_for_detection)
    size: tuple[int, int]    # the file's width, height
    grey: bool
    box: tuple               # the reference box, pixels of the file
    rel: tuple               # the same, relative to the photo's size


def load_labelled(images_dir, labels_csv, max_side: int = 512) -> list[Labelled]:
    """The photos of a labels file (Image, x0, y0, x1, y1 in the file's pixels, as
    ../shared/data/whales/labels.csv; rows with a blank box are skipped), decoded as the stage decodes
    them for the cnn detector with boxes.max_side = max_side."""
    import pandas as pd
    labels = pd.read_csv(labels_csv).dropna(subset=["x0", "y0", "x1", "y1"])
    out = []
    for r in labels.itertuples():
        rgb, (w, h), grey = boxes.decode_for_detection(Path(images_dir) / r.Image,
                                                       boxes.detection_side("cnn", max_side))
        box = (float(r.x0), float(r.y0), float(r.x1), float(r.y1))
        out.append(Labelled(r.Image, rgb, (w, h), grey, box, (box[0] / w, box[1] / h, box[2] / w, box[3] / h)))
    return out


def photo_statistics(photos: list[Labelled], copies: int = AUGMENT_COPIES, parts=None) -> list[dict]:
    return training_statistics([p.rgb for p in photos], [p.rel for p in photos], copies, parts=parts)


def fold_weights(stats: list[dict], alpha: float = RIDGE_ALPHA, folds: int | None = None) -> list[Weights]:
    """Per photo, the weights fitted without it (and its mirror image and copies): folds=None is
    leave-one-out, else `folds` contiguous folds (a fixed split: each fold's photos share one fit)."""
    total = combine(stats)
    n = len(stats)
    groups = np.arange(n) if folds is None else np.arange(n) * folds // n
    out = [None] * n
    for g in np.unique(groups):
        held = np.nonzero(groups == g)[0]
        weights = solve(combine([total] + [stats[i] for i in held], [1] + [-1] * len(held)), alpha)
        for i in held:
            out[i] = weights
    return out


def detect(photo: Labelled, weights: Weights, min_fraction: float = 0.10) -> tuple:
    """(x0, y0, x1, y1, method) in the file's pixels: boxes.detect_box on the decoded photo with these
    weights, scaled back as boxes.detect_box_file does (the stage's own code path)."""
    *box, method = boxes.detect_box(photo.rgb, grey=photo.grey, detector="cnn", min_fraction=min_fraction,
                                    cnn_weights=weights)
    return (*boxes.scale_box(box, photo.rgb.shape, photo.size), method)


def nested_choice(photos: list[Labelled], candidates: dict, outer: int) -> str:
    """The candidate (name -> (stats, alpha)) whose leave-one-out mean IoU over the photos other than
    `outer` is highest, its weights fitted without `outer` too: the choice made without the photo it
    will score. Scored on the classifier's own box (no GrabCut) to keep it quick."""
    best, best_score = None, -1.0
    others = [i for i in range(len(photos)) if i != outer]
    for name, (stats, alpha) in candidates.items():
        total = combine(stats)
        minus_outer = combine([total, stats[outer]], [1, -1])
        ious = []
        for j in others:
            w = solve(combine([minus_outer, stats[j]], [1, -1]), alpha)
            p = box_head.probability(stats[j]["map"], w)
            found = box_head.best_box(p) or (0, 0, 1, 1)
            ious.append(boxes.iou(found, photos[j].rel))
        score = float(np.mean(ious))
        if score > best_score:
            best, best_score = name, score
    return best
