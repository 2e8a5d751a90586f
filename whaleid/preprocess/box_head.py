"""The learned tail box (boxes.detector = "cnn"): a linear "inside the tail box?" score for every cell
of a frozen, ImageNet-pretrained EfficientNet-Lite0 feature map, the box that agrees best with the
scores, sharpened by GrabCut seeded from them.

    photo (decoded at <= 256 px) -> squashed to 256 x 128 -> Lite0 up to block 10 (stride 16: a
    16 x 8 map of 112 channels) -> per cell, design(): its features, the photo's mean, the maximum
    over its row and over its column (448 numbers) -> p = clip(w . design + b, 0, 1), the share of
    the cell inside the reference box -> the box maximising sum(p - 0.5) over the cells of p
    upsampled 4 times -> GrabCut (2 iterations) on a 96 px copy started from p (p >= 0.5 probable
    tail, p < 0.3 sure background, else probable background) -> the final box is the mean of the
    two boxes when they agree (IoU >= 0.5, method "cnn+grabcut"), else the classifier's box ("cnn").
    No cell above 0.5: nothing looks like a tail and the caller keeps the whole photo ("full-image").

What is fitted: w (448 numbers) and b, by ridge regression on standardised features (penalty
RIDGE_ALPHA per cell) of every cell of the labelled real photos (../shared/data/whales: 29), their
mirror images and AUGMENT_COPIES augmented copies of each (zoomed out into the photo's own sea,
cropped closer, relit, greyscale, mirrored): box_head_weights.py, written by scripts/fit_box_head.py.
Everything else (network, layer, input size, design, 0.5, the GrabCut seeds) is fixed here; those
choices were made looking at the leave-one-out figure, so scripts/bench_boxes.py --nested also makes
the main ones (design, alpha, augmentation) inside each fold, without the photo scored. The fit
is a sum of per-photo statistics, so leave-one-out is a subtraction: scripts/bench_boxes.py and
tests/test_box_head.py score each photo with a classifier fitted without it (and without its copies).

Why it should hold on photos nobody tuned on: the features are the pretrained network's (it has seen
whales, sea, haze and sky), so 449 numbers learn "tail-like texture, and where it is", not this set's
colours; the augmented copies teach it that a fluke may fill a small part of the photo (the original
photos are mostly cropped to the fluke, and without them a zoomed-out fluke gets the whole scene);
GrabCut only sharpens edges of a box the classifier already placed and is ignored when they disagree.

The network runs per photo at batch 1 (about 6 CPU-ms on one core), in whatever process or thread
detects the photo: it is built on first use and cached per process. A forked pool worker (the stage
cache forks only while the parent has not imported TensorFlow: workers.PhotoWork._pool) imports
TensorFlow afresh and runs it on one thread, so workers do not compete for cores; in the main process
(threads, or --workers 1) TensorFlow's threading is left as it is.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import sys
import threading
from typing import NamedTuple

import cv2
import numpy as np

DECODE_SIDE = 256                # photos are decoded at most this size (longer side) for this detector
INPUT_W, INPUT_H = 256, 128      # the network's input: the photo squashed to this size
LAYER = "block10_add"            # stride 16, 112 channels: a 16 x 8 map
UPSAMPLE = 4                     # the box is found on the map upsampled this many times
GRABCUT_SIDE = 96                # GrabCut's copy of the photo (longer side, px)
GRABCUT_SURE_BACKGROUND = 0.3    # p below this: sure background for GrabCut
GRABCUT_ITERATIONS = 2
RIDGE_ALPHA = 0.1                # ridge penalty per training cell (standardised features)
AUGMENT_COPIES = 8               # augmented copies of each training photo
AGREE = 0.5                      # GrabCut's box is used only when its IoU with the classifier's box is at least this

_lock = threading.Lock()
_net = None


# ---------------------------------------------------------------- the network

@contextlib.contextmanager
def tensorflow_here():
    """TensorFlow for this process's per-photo network (also subject_box.py's): a first import here is
    a pool worker's (or a --workers 1 run's), so TensorFlow's start-up lines are hidden as the CLI
    does; with TensorFlow already loaded (threads share this process) stderr is left alone. A pool
    worker runs on one thread (the pool is the parallelism); that must precede TensorFlow's first op."""
    from whaleid.pipeline.files import quiet_native_startup
    fresh = "tensorflow" not in sys.modules
    with quiet_native_startup() if fresh else contextlib.nullcontext():
        import tensorflow as tf
        if multiprocessing.parent_process() is not None:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(1)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass
        yield tf


def _build():
    with tensorflow_here() as tf:
        import keras

        from whaleid.backbones import efficientnet_lite
        full = efficientnet_lite.build(None, "imagenet", include_top=False)
        model = keras.Model(full.input, full.get_layer(LAYER).output, name="box_features")
        fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        fn(np.zeros((1, INPUT_H, INPUT_W, 3), np.float32))   # traced once, inside the quiet block
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
    from whaleid.backbones.efficientnet_lite import preprocess_input
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

class Weights(NamedTuple):
    w: np.ndarray            # one per design() column
    b: float
    parts: tuple = None      # design() parts (None: DESIGN)

DESIGN = ("cell", "mean", "rowmax", "colmax")


def design(maps: np.ndarray, parts=DESIGN) -> np.ndarray:
    """Per cell (..., h, w, len(parts) x 112): "cell" its own features; "mean" the photo's mean (what
    the whole scene looks like); "rowmax", "colmax" the maximum over its row and over its column (is
    there tail-like texture level with it, or above or below it: a cell of sea between the lobes is
    inside the box, one beside the tips is not)."""
    shape = maps.shape
    make = {"cell": lambda: maps,
            "mean": lambda: maps.mean(axis=(-3, -2), keepdims=True),
            "rowmax": lambda: maps.max(axis=-2, keepdims=True),
            "colmax": lambda: maps.max(axis=-3, keepdims=True)}
    return np.concatenate([np.broadcast_to(make[p](), shape) for p in parts], axis=-1)


def probability(map_: np.ndarray, weights) -> np.ndarray:
    """(h, w) probability that each cell lies inside the tail box."""
    return np.clip(design(map_, weights.parts or DESIGN) @ weights.w + weights.b, 0.0, 1.0)


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

def main_extent(mask: np.ndarray, close: int = 0) -> tuple[int, int, int, int] | None:
    """Extent of the components that make up the tail: the largest, plus every component at least
    a tenth of its size (the two lobes of a fluke can come apart). None when the mask is empty."""
    m = mask.astype(np.uint8)
    if close:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.nonzero(areas >= 0.1 * areas.max())[0] + 1
    x0 = stats[keep, cv2.CC_STAT_LEFT].min()
    y0 = stats[keep, cv2.CC_STAT_TOP].min()
    x1 = (stats[keep, cv2.CC_STAT_LEFT] + stats[keep, cv2.CC_STAT_WIDTH]).max()
    y1 = (stats[keep, cv2.CC_STAT_TOP] + stats[keep, cv2.CC_STAT_HEIGHT]).max()
    return int(x0), int(y0), int(x1), int(y1)



def grabcut_refine(rgb: np.ndarray, p: np.ndarray, side: int = GRABCUT_SIDE,
                   sure_background: float = GRABCUT_SURE_BACKGROUND, iterations: int = GRABCUT_ITERATIONS):
    """Relative box of GrabCut's foreground on a `side` px copy, its mask started from p; None if empty."""
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


def iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1), in any one unit."""
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
        if cut is not None and iou(cut, head) >= AGREE:
            return tuple((np.array(head) + np.array(cut)) / 2), "cnn+grabcut"
    return head, "cnn"


@functools.lru_cache(maxsize=1)
def shipped_weights() -> Weights:
    from whaleid.preprocess import box_head_weights as bw
    return Weights(np.asarray(bw.W, np.float32), float(bw.B), tuple(bw.DESIGN))


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
