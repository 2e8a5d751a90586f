"""The learned tail box (boxes.detector = "cnn"): a linear "inside the tail box?" classifier per cell of
a frozen, ImageNet-pretrained EfficientNet-Lite0 feature map, refined by GrabCut seeded from it.

    photo -> squash-resize to 256 x 128 -> Lite0 up to block 10 (stride 16: a 16 x 8 map of 112
    channels) -> per cell [its 112 features, the photo's mean 112] . w + b -> p = sigmoid, the
    probability that the cell lies inside the reference box -> the box that maximises sum(p - 0.5)
    over its (bilinearly upsampled) cells -> GrabCut on a 128 px copy, started from p (p >= 0.5
    probable tail, p < GRABCUT_SURE_BACKGROUND sure background, else probable background) -> the
    final box is the mean of the two boxes when they agree (IoU >= AGREE), else the classifier's box.
    Nothing above 0.5 anywhere: the whole photo.

What is fitted: w (224 numbers) and b, by L2-regularised logistic regression (box_head_weights.py,
written by scripts/fit_box_head.py) on the cells of the 29 real photos of ../shared/data/whales and
their mirror images, each cell's target the fraction of it inside the published detector's box.
Everything else (the network, its layer, the input size, the 0.5 and the GrabCut settings) is fixed
in this file. scripts/bench_boxes.py and tests/test_box_head.py measure it by leave-one-out: the
scored photo and its mirror image are left out of the fit.

Why it generalises where a colour model does not: the features are the pretrained network's (it has
seen whales, sea and sky), so the classifier learns "tail-like texture and shape" from 29 photos
with 224 weights, not thresholds of this set's colours; GrabCut only sharpens the edges of a box the
classifier already placed, and the classifier's box is kept when the two disagree.

The network runs once per photo at batch 1 (6 CPU-ms a photo on one core, 256 x 128), in whatever
process or thread detects the photo: it is built on first use and cached per process. A forked pool
worker (the stage cache forks only when the parent has not imported TensorFlow) imports TensorFlow
afresh and uses one thread, so workers do not compete for the cores; in-process (threads, or
--workers 1) TensorFlow's threading is left as it is.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import threading
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

INPUT_W, INPUT_H = 256, 128      # the network's input: the photo squashed to this size
LAYER = "block10_add"           # stride 16, 112 channels: a 16 x 8 map
UPSAMPLE = 4                     # the box is found on the map upsampled this many times
GRABCUT_SIDE = 128               # GrabCut's copy of the photo (longer side, px)
GRABCUT_SURE_BACKGROUND = 0.3    # p below this: sure background for GrabCut
GRABCUT_ITERATIONS = 4
RIDGE_ALPHA = 0.1                 # ridge penalty per training cell (standardised features)
AUGMENT_COPIES = 8                # augmented copies of each training photo
AGREE = 0.5                      # GrabCut's box is used only when its IoU with the classifier's box is at least this

_lock = threading.Lock()
_net = None


# ---------------------------------------------------------------- the network

def _build():
    import tensorflow as tf
    if multiprocessing.parent_process() is not None:
        # a pool worker: one thread each (the pool is the parallelism); must precede TF's first op
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
    import keras

    from . import efficientnet_lite
    full = efficientnet_lite.build(None, "imagenet", include_top=False)
    model = keras.Model(full.input, full.get_layer(LAYER).output, name="box_features")
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return fn, os.getpid()


def network():
    """The feature function of this process, built once (ImageNet weights from efficientnet_lite's cache)."""
    global _net
    with _lock:
        if _net is None or _net[1] != os.getpid():
            _net = _build()
        return _net[0]


def network_input(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (any size) -> the network's float input, INPUT_H x INPUT_W x 3."""
    from .efficientnet_lite import preprocess_input
    small = cv2.resize(rgb, (INPUT_W, INPUT_H), interpolation=cv2.INTER_AREA)
    return preprocess_input(small.astype(np.float32))


def feature_maps(rgbs: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """(n, 8, 16, 112) feature maps of the photos."""
    fn = network()
    out = []
    for i in range(0, len(rgbs), batch):
        x = np.stack([network_input(r) for r in rgbs[i:i + batch]])
        out.append(np.asarray(fn(x)))
    return np.concatenate(out) if out else np.zeros((0, INPUT_H // 16, INPUT_W // 16, 112), np.float32)


# ---------------------------------------------------------------- the classifier

def design(maps: np.ndarray) -> np.ndarray:
    """Per cell (..., h, w, 4 x 112): its own features; the photo's mean (what the whole scene looks
    like); the maximum over its row and over its column (is there tail-like texture anywhere level
    with it, or above or below it: a cell of sea between the lobes is inside the box, one beside the
    tips is not)."""
    shape = maps.shape
    return np.concatenate([maps,
                           np.broadcast_to(maps.mean(axis=(-3, -2), keepdims=True), shape),
                           np.broadcast_to(maps.max(axis=-2, keepdims=True), shape),
                           np.broadcast_to(maps.max(axis=-3, keepdims=True), shape)], axis=-1)


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


def statistics(maps: np.ndarray, rel_boxes) -> dict:
    """Sufficient statistics of a ridge fit of cell_targets on design(maps): counts and sums that add up
    over photos (so that leaving a photo out is a subtraction, not a refit over all the others)."""
    n, h, w, _ = maps.shape
    X = design(maps).reshape(n * h * w, -1).astype(np.float64)
    y = np.concatenate([cell_targets(b, h, w).ravel() for b in rel_boxes])
    return {"n": len(y), "x": X.sum(0), "xx": X.T @ X, "y": y.sum(), "xy": X.T @ y}


def combine(parts, sign=None) -> dict:
    sign = sign or [1] * len(parts)
    return {k: sum(s * p[k] for s, p in zip(sign, parts)) for k in parts[0]}


def solve(st: dict, alpha: float = RIDGE_ALPHA) -> tuple[np.ndarray, float]:
    """Ridge regression on standardised features, penalty alpha per cell (alpha * number of cells),
    intercept free; returns (w, b) on the raw features."""
    n = st["n"]
    mu, ym = st["x"] / n, st["y"] / n
    cov = st["xx"] / n - np.outer(mu, mu)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None)) + 1e-6
    cxy = st["xy"] / n - mu * ym
    coef = np.linalg.solve(cov / np.outer(sd, sd) + alpha * np.eye(len(sd)), cxy / sd)
    wv = coef / sd
    return wv.astype(np.float32), float(ym - mu @ wv)


def fit(maps: np.ndarray, rel_boxes, alpha: float = RIDGE_ALPHA) -> tuple[np.ndarray, float]:
    return solve(statistics(maps, rel_boxes), alpha)


def probability(map_: np.ndarray, weights) -> np.ndarray:
    """(h, w) probability that each cell lies inside the tail box."""
    wv, b = weights
    return np.clip(design(map_) @ wv + b, 0.0, 1.0)


def best_box(p: np.ndarray, up: int = UPSAMPLE, threshold: float = 0.5):
    """The box (relative x0,y0,x1,y1) maximising sum(p - threshold) over the cells of p upsampled `up`
    times (bilinear); None when no cell is above the threshold."""
    h, w = p.shape
    q = cv2.resize(p.astype(np.float32), (w * up, h * up), interpolation=cv2.INTER_LINEAR) - threshold
    if q.max() <= 0:
        return None
    H, W = q.shape
    rows = np.vstack([np.zeros((1, W)), np.cumsum(q, 0, dtype=np.float64)])
    y0, y1 = np.triu_indices(H + 1, 1)
    band = rows[y1] - rows[y0]                              # column sums of every row band y0..y1-1
    c = np.hstack([np.zeros((len(band), 1)), np.cumsum(band, 1)])
    low = np.minimum.accumulate(c, 1)
    gain = c - low                                          # best sum of a column run ending at x1
    k, x1 = np.unravel_index(int(np.argmax(gain)), gain.shape)
    x0 = int(np.argmax(c[k, :x1 + 1] == low[k, x1]))
    return x0 / W, y0[k] / H, x1 / W, y1[k] / H


# ---------------------------------------------------------------- GrabCut, seeded by the classifier

def grabcut_refine(rgb: np.ndarray, p: np.ndarray, side: int = GRABCUT_SIDE,
                   sure_background: float = GRABCUT_SURE_BACKGROUND, iterations: int = GRABCUT_ITERATIONS):
    """Relative box of GrabCut's foreground on a `side` px copy, its mask started from p; None if empty."""
    from .boxes import main_extent
    h, w = rgb.shape[:2]
    s = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    hh, ww = small.shape[:2]
    if hh < 4 or ww < 4:
        return None
    q = cv2.resize(p.astype(np.float32), (ww, hh), interpolation=cv2.INTER_LINEAR)
    mask = np.full((hh, ww), cv2.GC_PR_BGD, np.uint8)
    mask[q >= 0.5] = cv2.GC_PR_FGD
    mask[q < sure_background] = cv2.GC_BGD
    if not (mask == cv2.GC_PR_FGD).any() or not (mask != cv2.GC_PR_FGD).any():
        return None
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), mask, None, bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return None
    box = main_extent((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD), 3)
    if box is None:
        return None
    return box[0] / ww, box[1] / hh, box[2] / ww, box[3] / hh


def rel_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_from_map(rgb: np.ndarray, p: np.ndarray, grabcut: bool = True):
    """(relative box, method) from the probability map: "cnn+grabcut", "cnn", or (None, "full-image")."""
    head = best_box(p)
    if head is None:
        return None, "full-image"
    if grabcut:
        cut = grabcut_refine(rgb, p)
        if cut is not None and rel_iou(cut, head) >= AGREE:
            return tuple((np.array(head) + np.array(cut)) / 2), "cnn+grabcut"
    return head, "cnn"


@functools.lru_cache(maxsize=1)
def shipped_weights():
    from . import box_head_weights as bw
    return np.asarray(bw.W, np.float32), float(bw.B)


def detect(rgb: np.ndarray, weights=None, grabcut: bool = True):
    """(x0, y0, x1, y1, method) in rgb's pixels, or None when nothing is confident (caller: whole photo)."""
    weights = weights or shipped_weights()
    p = probability(feature_maps([rgb])[0], weights)
    box, method = box_from_map(rgb, p, grabcut)
    if box is None:
        return None
    h, w = rgb.shape[:2]
    return (max(0, int(np.floor(box[0] * w))), max(0, int(np.floor(box[1] * h))),
            min(w, int(np.ceil(box[2] * w))), min(h, int(np.ceil(box[3] * h))), method)


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


def training_statistics(rgbs: list[np.ndarray], rel_boxes, copies: int = AUGMENT_COPIES, seed: int = 0) -> list[dict]:
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
        out.append(statistics(maps, boxes_))
    return out


# ---------------------------------------------------------------- honest measurement

class Labelled(NamedTuple):
    name: str
    rgb: np.ndarray          # decoded as the boxes stage decodes it (boxes.decode_for_detection)
    size: tuple[int, int]    # the file's width, height
    box: tuple               # the reference box, pixels of the file
    rel: tuple               # the same, relative to the photo's size
    grey: bool


def load_labelled(images_dir, labels_csv, max_side: int = 512) -> list[Labelled]:
    """The photos of a labels file (Image, x0, y0, x1, y1 in the file's pixels; rows with a blank box
    are skipped), decoded as the boxes stage decodes them."""
    import pandas as pd

    from .boxes import decode_for_detection
    labels = pd.read_csv(labels_csv).dropna(subset=["x0", "y0", "x1", "y1"])
    out = []
    for r in labels.itertuples():
        rgb, (w, h), grey = decode_for_detection(Path(images_dir) / r.Image, max_side)
        box = (float(r.x0), float(r.y0), float(r.x1), float(r.y1))
        out.append(Labelled(r.Image, rgb, (w, h), box, (box[0] / w, box[1] / h, box[2] / w, box[3] / h), grey))
    return out


def leave_one_out(rgbs: list[np.ndarray], rel_boxes, alpha: float = RIDGE_ALPHA, grabcut: bool = True,
                  copies: int = AUGMENT_COPIES, folds: int | None = None, stats: list[dict] | None = None):
    """Cross-validated (relative box or None, method) per photo: the classifier scoring photo i is fitted
    on the other photos (and their mirror images and augmented copies) only. folds=None: leave-one-out;
    else k contiguous folds."""
    stats = stats or training_statistics(rgbs, rel_boxes, copies)
    total = combine(stats)
    maps = feature_maps(rgbs)
    n = len(rgbs)
    groups = np.arange(n) if folds is None else np.arange(n) * folds // n
    out = [None] * n
    for g in np.unique(groups):
        held = np.nonzero(groups == g)[0]
        weights = solve(combine([total] + [stats[i] for i in held], [1] + [-1] * len(held)), alpha)
        for i in held:
            out[i] = box_from_map(rgbs[i], probability(maps[i], weights), grabcut)
    return out
