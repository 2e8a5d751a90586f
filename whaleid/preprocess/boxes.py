"""boxes: a tail (or subject) bounding box for every photo, by a learned detector, the subject's class activation,
GrabCut or colour thresholds (design.md §3), or imported.

Inputs:    format/train.csv, format/new_whale.csv, format/test.csv, train/, test/,
           boxes.import_csv when set (`whaleid preprocess --boxes FILE`)
Artifacts: BB_TRAIN.csv, BB_TEST.csv   Image, x0, y0, x1, y1 (pixels of the full photo, x1/y1
           exclusive), method: cnn+grabcut | cnn | subject | subject-contrast | grabcut | dark | hsv-low-sat | hsv-high-sat | grey |
           imported | full-image
           import_report.csv           rows of the imported CSV that were refused, and why

boxes.detector = "cnn" (the default) is box_head.py: a linear classifier on the features of the
pretrained EfficientNet-Lite0 says which parts of the photo lie inside the tail box, GrabCut seeded
from it sharpens the edges; fitted on real photos (box_train.py, scripts/fit_box_head.py), measured
by leave-one-out (scripts/bench_boxes.py). The detectors below are the earlier ones, kept as settings.

The original: HSV; three-class Otsu thresholds th_S on saturation and th_V on the grey image; mask =
open(S < th_S[0], 5x5) AND (V < th_V[0]) (tails are darker and less saturated than sea and sky), or,
if empty, open(S > th_S[1]) AND (V < th_V[0]); box = the mask's extent; under 10% of the image ->
the whole image. Three changes make it hold on real photos. The box is the extent of the mask's
connected components that matter (the largest and any of comparable size), not of every stray dark
pixel of sea. Greyscale photos, which the original skipped, get a dark-body mask on the smoothed grey
image ("grey"). And photos get GrabCut first (boxes.detector = "grabcut"): the
underside of a fluke is often white, which no darkness or saturation threshold separates from sea
and sky, while a colour model of "what the border looks like" does. GrabCut starts from a rectangle
2% inside the photo's edge (sea and sky touch the edge; the tail seldom fills it) on a copy of
boxes.grabcut_side pixels and iterates until its mask settles; if it finds too little, the
dark-body mask ("dark" / "grey") is next. GrabCut was tuned by hand on the 29 real photos it is
scored on (0.856 there, 0.727 on 10 photos it had not seen: issue 15). "dark" and "hsv" (the
original's masks) remain as detectors. Detection runs on a copy downscaled to boxes.max_side and the
box is scaled back.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from skimage.filters import threshold_multiotsu

from whaleid.data import images
from whaleid.preprocess import box_head, subject_box
from whaleid.preprocess.box_head import iou, main_extent  # noqa: F401 (boxes.iou, boxes.main_extent: used by tests and scripts)
from whaleid.pipeline.stage import Run
from whaleid.stages import DETECT_SETTINGS

METHODS = ("cnn+grabcut", "cnn", "subject", "subject-contrast", "grabcut", "dark", "hsv-low-sat", "hsv-high-sat", "grey", "imported", "full-image")
COLUMNS = ["Image", "x0", "y0", "x1", "y1", "method"]


def _thresholds(channel: np.ndarray) -> np.ndarray | None:
    if channel.max() - channel.min() < 8:
        return None
    try:
        return threshold_multiotsu(channel, classes=3)
    except ValueError:
        return None


def _open(mask: np.ndarray, size: int) -> np.ndarray:
    kernel = np.ones((size, size), np.uint8)
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)


def grabcut_extent(rgb: np.ndarray, side: int = 160, inset: float = 0.02, max_iterations: int = 10):
    """Extent of GrabCut's foreground on a copy of `side` px, started from a rectangle `inset` inside
    the edge, in the pixel coords of `rgb`; None when it finds nothing or the photo is too small.

    GrabCut iterates until its mask stops changing (at most `max_iterations`): on the real photos the
    slow ones are fluke-in-whitewater shots, where the first iterations take the foam for tail
    (00caa5c60: IoU 0.69 after the fixed 3 iterations, 0.95 converged; 5.0 iterations on average)."""
    h, w = rgb.shape[:2]
    s = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    hh, ww = small.shape[:2]
    dx, dy = max(1, round(ww * inset)), max(1, round(hh * inset))
    if ww - 2 * dx < 4 or hh - 2 * dy < 4:
        return None
    bgr = np.ascontiguousarray(small[..., ::-1])
    mask, bgd, fgd = np.zeros((hh, ww), np.uint8), np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)  # GrabCut seeds its colour models with k-means: same photo, same box, any worker
    try:
        cv2.grabCut(bgr, mask, (dx, dy, ww - 2 * dx, hh - 2 * dy), bgd, fgd, 1, cv2.GC_INIT_WITH_RECT)
        for _ in range(max_iterations - 1):
            before = mask.copy()
            cv2.grabCut(bgr, mask, None, bgd, fgd, 1, cv2.GC_EVAL)
            if np.array_equal(mask, before):
                break
    except cv2.error:  # e.g. a flat photo: no colour model to fit
        return None
    box = main_extent((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD), 3)
    if box is None:
        return None
    sx, sy = w / ww, h / hh
    return (int(np.floor(box[0] * sx)), int(np.floor(box[1] * sy)),
            min(w, int(np.ceil(box[2] * sx))), min(h, int(np.ceil(box[3] * sy))))


def detect_box(rgb: np.ndarray, *, grey: bool | None = None, detector: str = "cnn", min_fraction: float = 0.10,
               open_size: int = 5, grabcut_side: int = 160, grabcut_max_iter: int = 10,
               cnn_weights: box_head.Weights | None = None) -> tuple[int, int, int, int, str]:
    """Tail box (x0, y0, x1, y1, method) in the pixel coords of `rgb` (x1, y1 exclusive).

    detector "cnn" (box_head.py): a classifier on pretrained EfficientNet-Lite0 features places the
    box, GrabCut seeded from it sharpens it ("cnn+grabcut", or "cnn" when they disagree); nothing
    tail-like anywhere, or a box under min_fraction: the whole photo. "subject" (subject_box.py): the
    animal of any species, from the backbone's class activation over ImageNet's animal classes. cnn_weights: another fit of
    its classifier (cross-validation), else the shipped one. "grabcut": GrabCut, then the dark-body mask; "dark": the dark-body mask alone (the
    underside of a fluke is often white, and saturation adds sea, not tail); "hsv": the original's
    saturation + value masks. Greyscale photos get GrabCut too (better on 5 of the 9 real grey
    photos, by up to 0.07 IoU, worse on 2 by 0.01-0.02), else the dark-body mask ("grey")."""
    h, w = rgb.shape[:2]
    if grey is None:
        grey = images.channels_equal(rgb)
    box, method = None, "full-image"
    if detector == "cnn":
        found = box_head.detect(rgb, cnn_weights)
        if found is None:          # nothing anywhere looks like a tail: the whole photo, not a guess
            return 0, 0, w, h, "full-image"
        *box, method = found
        if (box[2] - box[0]) * (box[3] - box[1]) < min_fraction * w * h:
            return 0, 0, w, h, "full-image"
        return (*box, method)
    if detector == "subject":  # subject_box.py: the animal, whatever the species
        found = subject_box.detect(rgb)
        if found is None or (found[2] - found[0]) * (found[3] - found[1]) < min_fraction * w * h:
            return 0, 0, w, h, "full-image"
        return found
    if detector == "grabcut":
        box = grabcut_extent(rgb, grabcut_side, max_iterations=grabcut_max_iter)
        method = "grabcut"
        if box is not None and (box[2] - box[0]) * (box[3] - box[1]) < min_fraction * w * h:
            box = None
    v = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    th_v = _thresholds(v) if box is None else None
    close = max(3, (min(h, w) // 20) | 1)
    if th_v is not None and not grey and detector == "hsv":
        s = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
        th_s = _thresholds(s)
        if th_s is not None:
            dark = v < th_v[0]
            box = main_extent(_open(s < th_s[0], open_size) & dark, close)
            method = "hsv-low-sat"
            if box is None:
                box = main_extent(_open(s > th_s[1], open_size) & dark, close)
                method = "hsv-high-sat"
    if box is None and th_v is not None:
        # The tail is the large dark body; sea and sky are brighter. Smooth first so waves and
        # pigment speckle do not fragment it; Otsu's lowest class, opened, then closed into one body.
        smooth = cv2.GaussianBlur(v, (0, 0), 2.0 * max(h, w) / 512)
        th = _thresholds(smooth)
        if th is not None:
            box = main_extent(_open(smooth < th[0], open_size), close)
            method = "grey" if grey else "dark"
    if box is None:
        return 0, 0, w, h, "full-image"
    x0, y0, x1, y1 = box
    if (x1 - x0) * (y1 - y0) < min_fraction * w * h:
        return 0, 0, w, h, "full-image"
    return x0, y0, x1, y1, method


def decode_for_detection(path, max_side: int = 512) -> tuple[np.ndarray, tuple[int, int], bool]:
    """(RGB pixels at most max_side on the longer side, the file's (width, height), greyscale file?)."""
    w, h = images.image_size(path)
    img = images.open_image(path, draft_size=(max_side, max_side))
    grey = images.is_grey(img)
    img = images.to_rgb(img)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), images.Image.Resampling.BILINEAR)
    return np.asarray(img), (w, h), grey


def detection_side(detector: str, max_side: int) -> int:
    """The longer side a photo is decoded at for `detector`: boxes.max_side, and for "cnn" at most
    box_head.DECODE_SIDE (its network sees 256 x 128, its GrabCut 96 px: more pixels only cost decoding),
    for "subject" at most subject_box.DECODE_SIDE."""
    limit = {"cnn": box_head.DECODE_SIDE, "subject": subject_box.DECODE_SIDE}.get(detector, max_side)
    return min(max_side, limit)


def detect_box_file(path, *, max_side: int = 512, detector: str = "cnn", min_fraction: float = 0.10,
                    open_size: int = 5, grabcut_side: int = 160, grabcut_max_iter: int = 10):
    """Decode at reduced size, detect, scale the box back to the file's full size."""
    rgb, (w, h), grey = decode_for_detection(path, detection_side(detector, max_side))
    *box, method = detect_box(rgb, grey=grey, detector=detector, min_fraction=min_fraction, open_size=open_size,
                              grabcut_side=grabcut_side, grabcut_max_iter=grabcut_max_iter)
    return (*scale_box(box, rgb.shape, (w, h)), method)


def scale_box(box, shape, size) -> tuple[int, int, int, int]:
    """A box in the pixels of an array of `shape` -> the pixels of the file of size (w, h), rounded outwards."""
    w, h = size
    sx, sy = w / shape[1], h / shape[0]
    return (max(0, int(np.floor(box[0] * sx))), max(0, int(np.floor(box[1] * sy))),
            min(w, int(np.ceil(box[2] * sx))), min(h, int(np.ceil(box[3] * sy))))


def read_box_csv(path, sizes: dict[str, tuple[int, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(good rows, refused rows with a `reason`) of a box CSV Image,x0,y0,x1,y1 (the published format)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"box file {path}: not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    for col in ("Image", "x0", "y0", "x1", "y1"):
        if col not in df.columns:
            raise ValueError(f"box file {path}: missing column '{col}' (expected Image,x0,y0,x1,y1)")
    good, bad = [], []
    seen = set()
    for i, r in enumerate(df.itertuples(index=False), start=2):
        name = r.Image.strip()
        try:
            x0, y0, x1, y1 = (float(getattr(r, c)) for c in ("x0", "y0", "x1", "y1"))
        except ValueError:
            bad.append((name, i, "missing or non-numeric coordinate"))
            continue
        if name in seen:
            bad.append((name, i, "image listed twice (first row kept)"))
            continue
        if name not in sizes:
            bad.append((name, i, "not used: not in the data set, unreadable, or a dropped duplicate"))
            continue
        w, h = sizes[name]
        if not (x0 < x1 and y0 < y1):
            bad.append((name, i, f"empty box: need x0 < x1 and y0 < y1, got {x0:g},{y0:g},{x1:g},{y1:g}"))
            continue
        if x0 < -1 or y0 < -1 or x1 > w + 1 or y1 > h + 1:
            bad.append((name, i, f"box {x0:g},{y0:g},{x1:g},{y1:g} outside the {w}x{h} image"))
            continue
        seen.add(name)
        good.append((name, max(0, int(round(x0))), max(0, int(round(y0))), min(w, int(round(x1))),
                     min(h, int(round(y1))), "imported"))
    return (pd.DataFrame(good, columns=COLUMNS),
            pd.DataFrame(bad, columns=["Image", "row", "reason"]))


def _detect_job(job, **settings):
    name, path = job
    try:
        return name, detect_box_file(path, **settings), None
    except images.BadImage as e:
        return name, None, str(e)


def run(run: Run) -> dict:
    tables = {"train": pd.concat([run.read_csv("format", "train.csv"), run.read_csv("format", "new_whale.csv")]),
              "test": run.read_csv("format", "test.csv")}
    imported, refused = pd.DataFrame(columns=COLUMNS), pd.DataFrame(columns=["Image", "row", "reason"])
    if run.setting("boxes.import_csv"):
        sizes = {r.Image: (int(r.width), int(r.height)) for t in tables.values() for r in t.itertuples()}
        try:
            imported, refused = read_box_csv(run.setting("boxes.import_csv"), sizes)
        except ValueError as e:  # a missing or unreadable file: a message, not a traceback
            from whaleid.pipeline.stage import StageError
            raise StageError(f"{e} (boxes.import_csv: pass --boxes FILE, or --unset boxes.import_csv to "
                             f"detect the boxes)") from None
        run.echo(f"imported {len(imported)} boxes from {run.setting('boxes.import_csv')}; {len(refused)} rows "
                 f"refused (replaced by detection, see {run.path('import_report.csv')})")
    run.write_csv("import_report.csv", refused)
    have = set(imported.Image)
    detect = partial(_detect_job, **{key.split(".")[1]: run.setting(key) for key in DETECT_SETTINGS})
    counts = {}
    for folder, table in tables.items():
        jobs = [(r.Image, str(run.data / folder / r.Image)) for r in table.itertuples() if r.Image not in have]
        rows = []
        for name, box, error in run.map_resumable(detect, jobs, f"{folder} boxes", key=lambda job: job[0], chunk=64):
            if error:
                run.skip(name, error)
            else:
                rows.append((name, *box))
        out = pd.concat([imported[imported.Image.isin(set(table.Image))], pd.DataFrame(rows, columns=COLUMNS)])
        out = out.set_index("Image").loc[[i for i in table.Image if i in set(out.Image)]].reset_index()
        run.write_csv(f"BB_{folder.upper()}.csv", out)
        for m, n in out.method.value_counts().items():
            counts[m] = counts.get(m, 0) + int(n)
    run.echo("methods: " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items())))
    return counts
