"""keypoints: local features of every photo that scoring can use, for re-ranking (similarity/local.py).

Inputs:    format/train.csv + new_whale.csv, boxes/BB_TRAIN.csv, the data folder's train/ (keypoints);
           format/test.csv, boxes/BB_TEST.csv, test/ (test_keypoints)
Artifacts: keypoints.npz  names, per-photo offsets into points (x, y in the crop, float16) and
                          descriptors (uint8: RootSIFT x 512, or ORB's bits; float16: XFeat's 64-d
                          unit vectors), crop sizes, the method and its weights' sha256; with
                          mirrors (train.flip_ids and predict.mirror_is_same) the same of each
                          photo's mirror image under m_*

Each photo is cropped to its box (+ augment.margin) and resized so its longer side is keypoints.side,
keeping its aspect (geometric verification needs the true shape), then keypoints.method's features,
at most keypoints.max_points of the strongest, are computed. A stage of its own rather than part of
augment: augment feeds training, so a keypoint setting there would retrain the model; and test photos,
which augment never sees, need features too. Two stages run this module: keypoints (training photos:
gallery and validation queries) and test_keypoints (test photos, for predict only), so a changed test
photo never reruns evaluate. They run only when rerank.method = local (pipeline/stages.py: wanted).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import threading

import cv2
import numpy as np
import pandas as pd

from whaleid.preprocess import augment, masks
from whaleid.data import images
from whaleid.pipeline.stage import Run, StageError, atomic_path

SIFT_SCALE = 512.0  # RootSIFT components lie in [0, ~0.5]: x 512 fits uint8 with 1/512 steps
_DETECTORS: dict = {}
_LOCK = threading.Lock()


def detector(method: str, max_points: int):
    """One OpenCV detector per process and settings (creating SIFT per photo costs time)."""
    key = (method, max_points)
    if key not in _DETECTORS:
        if method == "sift":
            _DETECTORS[key] = cv2.SIFT_create(nfeatures=max_points)
        elif method == "orb":
            _DETECTORS[key] = cv2.ORB_create(nfeatures=max_points)
        else:
            raise ValueError(f"unknown keypoint method {method!r}")
    return _DETECTORS[key]


def binary(method: str) -> bool:
    """ORB's descriptors are bit strings (Hamming distance); SIFT's and XFeat's are vectors."""
    return method == "orb"


WIDTH = {"sift": 128, "orb": 32, "xfeat": 64, "aliked": 128}          # descriptor length (bytes for ORB)
DTYPE = {"sift": np.uint8, "orb": np.uint8, "xfeat": np.float16, "aliked": np.float16}
COLOUR = ("aliked",)  # extractors that read the crop in colour (the others grey)
# ALIKED's least keypoint score, below the authors' 0.2: on nyala's animal masks at 480 px 0.2 leaves a
# median of ~400 points (XFeat: 1,000), and 0.05 named the right nyala more often (docs/measurements.md)
ALIKED_MIN_SCORE = 0.05


def weights_digest(method: str) -> str:
    """What the features were computed with, stored in the artifact: a learned extractor's weights."""
    if method == "xfeat":
        from whaleid.backbones import xfeat  # TensorFlow: only for the learned extractors
        return xfeat.XFEAT_SHA256
    if method == "aliked":
        from whaleid.backbones import aliked
        return aliked.ALIKED_SHA256
    return ""


def root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, square root; unit L2 norm, so the
    Euclidean distance of RootSIFT is the Hellinger kernel of SIFT."""
    desc = np.asarray(desc, np.float32)
    return np.sqrt(desc / (desc.sum(1, keepdims=True) + 1e-7))


def xfeat_features(grey: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """XFeat's `limit` best keypoints and descriptors of a grey crop: resized to multiples of 32 as the
    authors do (bilinear), the points scaled back to the crop's pixels."""
    h, w = grey.shape
    h32, w32 = max(32, h // 32 * 32), max(32, w // 32 * 32)
    small = cv2.resize(grey, (w32, h32), interpolation=cv2.INTER_LINEAR) if (h32, w32) != (h, w) else grey
    maps = [np.asarray(m)[0] for m in _xfeat_net()(small[None, :, :, None].astype(np.float32))]
    from whaleid.backbones import xfeat
    pts, _, desc = xfeat.detect(*maps, top_k=limit)
    pts = pts * np.float32([w / w32, h / h32])
    return pts.astype(np.float16), desc.astype(np.float16)


def aliked_features(rgb: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """ALIKED's `limit` best keypoints (score over ALIKED_MIN_SCORE) and descriptors of a colour crop
    (uint8) at its own size."""
    pts, _, desc = _aliked_net().features(rgb.astype(np.float32) / 255.0, limit, ALIKED_MIN_SCORE)
    return pts.astype(np.float16), desc.astype(np.float16)


def _aliked_net():
    if "aliked" not in _DETECTORS:
        with _LOCK:
            if "aliked" not in _DETECTORS:
                from whaleid.backbones import aliked
                _DETECTORS["aliked"] = aliked.ALIKED()
    return _DETECTORS["aliked"]


def _xfeat_net():
    """The XFeat CNN, built once per process, as one graph for any crop size (no retracing)."""
    if "xfeat" not in _DETECTORS:
        with _LOCK:
            if "xfeat" not in _DETECTORS:
                import tensorflow as tf

                from whaleid.backbones import xfeat
                net = xfeat.build(1, xfeat.read_weights())
                _DETECTORS["xfeat"] = tf.function(
                    net, input_signature=[tf.TensorSpec([1, None, None, 1], tf.float32)], reduce_retracing=True)
    return _DETECTORS["xfeat"]


def features(crop: np.ndarray, method: str, max_points: int,
             mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(points (n, 2) float16 x, y; descriptors (n, D) of DTYPE[method]) of a crop (grey, or colour for
    the COLOUR methods), the max_points strongest (of those on `mask`, a bool mask of the crop at any
    resolution, when given: the detector looks there only, and every stored point, as stored, passes
    masks.inside, the one rule)."""
    limit = max_points if mask is None else 4 * max_points  # learned extractors: the best of those on the mask
    if method == "xfeat":
        pts, desc = xfeat_features(crop, limit)
    elif method == "aliked":
        pts, desc = aliked_features(crop, limit)
    else:
        pts, desc = opencv_features(crop, method, max_points, mask)
    if mask is not None:
        keep = masks.inside(mask, pts.astype(np.float32), crop.shape[1], crop.shape[0])
        pts, desc = pts[keep][:max_points], desc[keep][:max_points]
    return pts, desc


def opencv_features(grey: np.ndarray, method: str, max_points: int, mask: np.ndarray | None) -> tuple:
    on = None if mask is None else masks.resized(mask, grey.shape[1], grey.shape[0]).astype(np.uint8) * 255
    points, desc = detector(method, max_points).detectAndCompute(grey, on)
    if desc is None or not points:
        return np.zeros((0, 2), np.float16), np.zeros((0, WIDTH[method]), DTYPE[method])
    if len(points) > max_points:  # SIFT may keep ties beyond nfeatures
        keep = np.argsort([-p.response for p in points], kind="stable")[:max_points]
        points, desc = [points[i] for i in keep], desc[keep]
    xy = np.float32([p.pt for p in points]).astype(np.float16)
    if method == "sift":
        desc = np.clip(np.round(root_sift(desc) * SIFT_SCALE), 0, 255).astype(np.uint8)
    return xy, np.ascontiguousarray(desc, np.uint8)


def as_float(desc: np.ndarray) -> np.ndarray:
    """Stored RootSIFT back to unit float32 vectors."""
    d = desc.astype(np.float32)
    return d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-7)


def crop_photo(path, box, margin: float, side: int) -> np.ndarray:
    """The photo cropped to box + margin, longer side resized to `side`, aspect kept; grey uint8."""
    return crop_rgb(path, box, margin, side, grey=True)


def crop_rgb(path, box, margin: float, side: int, grey: bool = False) -> np.ndarray:
    """crop_photo in colour (the animal's mask reads colours), or grey (made grey before resizing)."""
    rgb, (x0, y0, x1, y1) = augment.decode_for_crop(Path(path), box, side)
    h, w = rgb.shape[:2]
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    x0, y0 = max(0, int(round(x0 - mx))), max(0, int(round(y0 - my)))
    x1, y1 = min(w, int(round(x1 + mx))), min(h, int(round(y1 + my)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        x0, y0, x1, y1 = 0, 0, w, h
    crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    if grey:
        crop = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    scale = side / max(crop.shape[:2])
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    return cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def prepare(method: str, mask: bool = False) -> None:
    """Load a learned extractor (and the animal mask's network) once, in this process, before the
    photos are shared out: a missing weights file is one error here, and the workers are threads
    sharing the one model."""
    if method == "xfeat":
        _xfeat_net()
    if method == "aliked":
        _aliked_net()
    if mask:
        from whaleid.preprocess import subject_box
        subject_box.network()


def _one(job, margin: float, side: int, method: str, max_points: int, mirror: bool, mask: bool = False):
    """Worker: (image, (points, desc, size, mirror points, mirror desc, animal mask or None) or None, error)."""
    image, path, box = job
    try:
        rgb = crop_rgb(path, box, margin, side) if mask or method in COLOUR else None
        crop = rgb if method in COLOUR else crop_photo(path, box, margin, side)
    except images.BadImage as e:
        return image, None, str(e)
    animal = masks.animal_mask(rgb)[0] if mask else None
    pts, desc = features(crop, method, max_points, animal)
    m = (features(np.ascontiguousarray(crop[:, ::-1]), method, max_points,
                  None if animal is None else np.ascontiguousarray(animal[:, ::-1])) if mirror else (None, None))
    return image, (pts, desc, crop.shape[1::-1], m[0], m[1], animal), None


class Store:
    """keypoints.npz files read back: features of a photo by name (empty arrays for a photo without any)."""

    def __init__(self, *paths: Path):
        self.parts = []
        for path in paths:
            with np.load(path, allow_pickle=False) as z:
                self.parts.append({k: z[k] for k in z.files})
        self.method = str(self.parts[0]["method"])
        self.index = {str(n): (j, i) for j, part in enumerate(self.parts) for i, n in enumerate(part["names"])}
        self.mirrored = all("m_offsets" in part for part in self.parts)

    def __contains__(self, image: str) -> bool:
        return image in self.index

    def get(self, image: str, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        p = "m_" if mirror else ""
        j, i = self.index.get(image, (0, None))
        part = self.parts[j]
        if i is None:
            return np.zeros((0, 2), np.float32), part[p + "desc"][:0]
        a, b = part[p + "offsets"][i:i + 2]
        return part[p + "points"][a:b].astype(np.float32), part[p + "desc"][a:b]

    def mask(self, image: str) -> np.ndarray | None:
        """The photo's animal mask (keypoints.mask), on its crop at masks.SIDE px; None without masks."""
        j, i = self.index[image]
        return masks.unpack(self.parts[j], i) if "mask_bits" in self.parts[j] else None

    def size(self, image: str) -> tuple[int, int]:
        j, i = self.index[image]
        return tuple(int(v) for v in self.parts[j]["sizes"][i])


def store_path(session, stage: str) -> Path:
    """A keypoint stage's features; an error naming the stage when it has not run."""
    path = session.dir(stage) / "keypoints.npz"
    if session.manifest(stage) is None or not path.exists():
        raise StageError(f"{path} is missing: the {stage} stage has not run (rerank.method = local runs it)")
    return path


def pack(results: list, method: str, mirror: bool) -> dict[str, np.ndarray]:
    """[(image, points, desc, size, m_points, m_desc[, animal mask or None])] -> the npz's arrays (the
    masks under mask_*, masks.pack's, when every photo has one)."""
    out = {"names": np.array([r[0] for r in results], dtype=str), "method": np.array(method),
           "weights": np.array(weights_digest(method)),
           "sizes": np.array([r[3] for r in results], np.int32).reshape(-1, 2)}
    for prefix, (pi, di) in (("", (1, 2)), ("m_", (4, 5))) if mirror else (("", (1, 2)),):
        counts = [len(r[pi]) for r in results]
        out[prefix + "offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        pts = [r[pi] for r in results if len(r[pi])]
        desc = [r[di] for r in results if len(r[di])]
        out[prefix + "points"] = np.concatenate(pts) if pts else np.zeros((0, 2), np.float16)
        out[prefix + "desc"] = np.concatenate(desc) if desc else np.zeros((0, WIDTH[method]), DTYPE[method])
    if results and all(len(r) > 6 and r[6] is not None for r in results):
        out.update(masks.pack([r[6] for r in results]))
    return out


def write_store(run: Run, name: str, arrays: dict) -> Path:
    with atomic_path(run.path(name)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return run.path(name)


def compute(run: Run, tables: tuple[str, ...], box_file: str) -> dict:
    """Features of the photos of format's `tables` that have a box in `box_file`."""
    method = run.setting("keypoints.method")
    mirror = run.setting("train.flip_ids") and run.setting("predict.mirror_is_same")
    photos = pd.concat([run.read_csv("format", n) for n in tables], ignore_index=True).drop_duplicates("Image")
    boxes = run.read_csv("boxes", box_file).drop_duplicates("Image").set_index("Image")
    photos = photos[photos.Image.isin(boxes.index)]
    jobs = [(r.Image, str(run.data / r.folder / r.Image),
             tuple(int(v) for v in boxes.loc[r.Image, ["x0", "y0", "x1", "y1"]])) for r in photos.itertuples()]
    mask = run.setting("keypoints.mask")
    work = partial(_one, margin=run.setting("augment.margin"), side=run.setting("keypoints.side"),
                   method=method, max_points=run.setting("keypoints.max_points"), mirror=mirror, mask=mask)
    prepare(method, mask)
    results = []
    for image, got, error in run.map_resumable(work, jobs, "local features", key=lambda job: job[0], chunk=64):
        if error:
            run.skip(image, error)
            continue
        results.append((image, *got))
    arrays = pack(results, method, mirror)
    write_store(run, "keypoints.npz", arrays)
    n = np.diff(arrays["offsets"])
    return {"photos": len(results), "keypoints": int(n.sum()), "median_per_photo": float(np.median(n)) if len(n) else 0,
            "mirrored": bool(mirror), **({"median_mask_share": round(float(np.median(
                [r[6].mean() for r in results])), 3) if results else 0} if mask else {})}


def run_train(run: Run) -> dict:
    """The training photos: the gallery and evaluate's validation queries (new_whale photos too)."""
    return compute(run, ("train.csv", "new_whale.csv"), "BB_TRAIN.csv")


def run_test(run: Run) -> dict:
    return compute(run, ("test.csv",), "BB_TEST.csv")
