"""The subject box (boxes.detector = "subject"): where the animal is, for a catalogue of any species,
with nothing to fit and nothing to download.

Re-identification photos of nyala, lions and the like are whole scenes: the animal fills a third of
the frame, and the pattern that tells individuals apart shrinks to a few pixels when the whole scene
is squeezed to the network's input. The pretrained EfficientNet-Lite0 (ImageNet weights from its pip
package) already knows where an animal is: its class activation map (CAM) over ImageNet's animal
classes (0-397: fish, birds, reptiles, amphibians, mammals, invertebrates) lights up the animal.

    photo (decoded at <= DECODE_SIDE) -> squashed to INPUT x INPUT -> Lite0: the 1280-channel map F
    (stride 32) and the 1000 logits -> p, the softmax probabilities of the animal classes
    (renormalised) -> cam = F . (W[:, animals] p), upsampled to the photo -> scaled to 0..1 over
    the photo -> the box of the region cam >= THRESHOLD (its largest component and any of comparable
    size, boxes.main_extent), widened by MARGIN of its size on each side.  method "subject".

When the network sees no animal (the animal classes, 40% of ImageNet's, hold less than ANIMAL_MIN of the
probability, or the CAM varies by less than CAM_MIN_RANGE over the photo) the CAM says little; the box is then
where the colours differ most from the photo's border ("subject-contrast": the CIELAB distance of each
pixel from the border's median colour), which finds a lone object on a plain background. The
caller keeps the whole photo when the box is under boxes.min_fraction of it.

The network runs per photo at batch 1 in whatever process detects the photo (built on first use and
cached per process, one thread in a pool worker: box_head.tensorflow_here).
"""
from __future__ import annotations

import os
import threading

import cv2
import numpy as np

from whaleid.preprocess.box_head import main_extent, tensorflow_here

DECODE_SIDE = 384          # photos are decoded at most this size (longer side) for this detector
INPUT = 320                # the network's input: the photo squashed to INPUT x INPUT (a 10 x 10 map)
ANIMALS = slice(0, 398)    # ImageNet classes 0-397 are animals
ANIMAL_MIN = 0.45          # below this share of probability on the animal classes: the contrast map instead
CAM_MIN_RANGE = 3.0        # ... and when the CAM varies less than this over the photo (logit units)
THRESHOLD = 0.3            # the map, scaled to 0..1, at or above this is the subject
MARGIN = 0.06              # the box widened by this share of its width / height on each side
CONTRAST_SIDE = 96         # the colour contrast map's copy of the photo (longer side, px)

_lock = threading.Lock()
_net = None


def _build():
    with tensorflow_here() as tf:
        import keras

        from whaleid.backbones import efficientnet_lite
        full = efficientnet_lite.build(None, "imagenet", include_top=True)
        model = keras.Model(full.input, [full.get_layer("head_relu").output, full.output], name="subject")
        dense = full.get_layer("predictions").get_weights()[0]            # (1280, 1000)
        fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        fn(np.zeros((1, INPUT, INPUT, 3), np.float32))   # traced once, inside the quiet block
    return fn, dense, os.getpid()


def network():
    """(the feature + logits function, the top's dense kernel) of this process, built once."""
    global _net
    with _lock:
        if _net is None or _net[2] != os.getpid():
            _net = _build()
        return _net[:2]


def subject_map(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """(a map over the photo, scaled to 0..1; the animal classes' share of probability, 0 when the
    map is not the CAM). The map is the animal CAM (INPUT/32 cells a side) when it shows an animal
    (see the module's doc), else the colour contrast map (contrast_map)."""
    from whaleid.backbones.efficientnet_lite import preprocess_input
    fn, dense = network()
    x = preprocess_input(cv2.resize(rgb, (INPUT, INPUT), interpolation=cv2.INTER_AREA).astype(np.float32))
    features, logits = (np.asarray(t, np.float64)[0] for t in fn(x[None]))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    animal = float(p[ANIMALS].sum())
    cam = features @ (dense[:, ANIMALS].astype(np.float64) @ (p[ANIMALS] / animal))
    if animal < ANIMAL_MIN or np.ptp(cam) < CAM_MIN_RANGE:
        return _unit(contrast_map(rgb)), 0.0
    return _unit(cam), animal


def contrast_map(rgb: np.ndarray, side: int = CONTRAST_SIDE) -> np.ndarray:
    """Per pixel of a copy `side` px on its longer side, the CIELAB distance of its smoothed colour
    from the median colour of the photo's border (what the background looks like)."""
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(rgb, (max(3, round(w * s)), max(3, round(h * s))), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(cv2.GaussianBlur(small, (0, 0), 1.0), cv2.COLOR_RGB2LAB).astype(np.float32)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    return np.linalg.norm(lab - np.median(border, axis=0), axis=-1)


def _unit(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi - lo > 1e-9 else np.zeros_like(m)


def box_from_map(m: np.ndarray, width: int, height: int, threshold: float = THRESHOLD,
                 margin: float = MARGIN) -> tuple[int, int, int, int] | None:
    """The box (pixels of a width x height photo, x1/y1 exclusive) of the region m >= threshold, m
    upsampled (bilinear) to the photo's aspect, widened by margin; None when the map is flat."""
    if not m.any():
        return None
    scale = 256 / max(width, height)
    ww, hh = max(1, round(width * scale)), max(1, round(height * scale))
    up = cv2.resize(m.astype(np.float32), (ww, hh), interpolation=cv2.INTER_LINEAR)
    box = main_extent(up >= threshold * up.max())
    if box is None:
        return None
    x0, y0, x1, y1 = (v / scale for v in box)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return (max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy))),
            min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy))))


def detect(rgb: np.ndarray) -> tuple[int, int, int, int, str] | None:
    """(x0, y0, x1, y1, method) in rgb's pixels, or None when the map is flat (caller: whole photo)."""
    h, w = rgb.shape[:2]
    m, animal = subject_map(rgb)
    box = box_from_map(m, w, h)
    if box is None:
        return None
    return (*box, "subject" if animal > 0 else "subject-contrast")
