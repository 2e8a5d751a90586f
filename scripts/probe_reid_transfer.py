"""How much identity do frozen ImageNet features hold, and how much does a metric learnt on OTHER
individuals add? Closed-set top-1 (1-NN) on a data folder made by `whaleid import-folders --train-only`
(or scripts/bench_reid.py --extra-train's WORK/data), no fine-tuning.

    python scripts/probe_reid_transfer.py --data DIR [--backbones EfficientNetLite0,EfficientNetLite2]
                                          [--sizes 224,320] [--crops whole,subject] [--cache DIR]

For each backbone, input size and crop (the whole photo, or boxes.detector=subject's box around the
animal), the photos are squashed to size x size and embedded by the pretrained network (GeM, p=3, of the
1280-channel head). Each test photo of a known individual gets the id of its nearest train photo
(cosine) among the tested individuals' train photos (the gallery). Embeddings:
    raw       the pooled features, L2-normalised
    pca-w     whitened by a PCA fitted on the train-only individuals' photos (PCA_DIMS dimensions)
    lda       projected on the discriminant directions of the train-only individuals (within-id
              scatter whitened, LDA_DIMS directions): what tells individuals apart, learnt from others
The train-only individuals are never queried or in the gallery: the projections are learnt on them only.
Features are cached per (backbone, size, crop) in --cache. Reads only the data folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from whaleid.data.tables import NEW_WHALE  # noqa: E402

PCA_DIMS = 256
LDA_DIMS = 128
SHRINK = 0.1        # within-id scatter shrunk towards its mean eigenvalue (few photos per id)


def load(path: Path, crop: str, size: int, box_cache: dict) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    if crop == "subject":
        if path.name not in box_cache:
            from whaleid.preprocess import boxes
            small, (w, h), grey = boxes.decode_for_detection(path, 384)
            *box, _ = boxes.detect_box(small, grey=grey, detector="subject")
            box_cache[path.name] = boxes.scale_box(box, small.shape, (w, h))
        x0, y0, x1, y1 = box_cache[path.name]
        rgb = rgb[y0:y1, x0:x1]
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def embed(data: Path, rows: pd.DataFrame, backbone: str, size: int, crop: str, cache: Path) -> np.ndarray:
    file = cache / f"{backbone}_{size}_{crop}.npz"
    if file.exists():
        z = np.load(file, allow_pickle=True)
        if list(z["images"]) == list(rows.Image):
            return z["features"]
    import keras
    from whaleid.backbones import efficientnet_lite as lite
    net = lite.build(size, "imagenet", variant=backbone)
    gem = keras.Model(net.input, keras.ops.mean(keras.ops.maximum(net.output, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3))
    boxes_file = cache / "subject_boxes.npz"
    box_cache = dict(np.load(boxes_file, allow_pickle=True)["boxes"].item()) if boxes_file.exists() else {}
    out = []
    for i in range(0, len(rows), 32):
        batch = rows.iloc[i:i + 32]
        x = np.stack([load(data / f / im, crop, size, box_cache) for f, im in zip(batch.folder, batch.Image)])
        out.append(np.asarray(gem.predict_on_batch(lite.preprocess_input(x.astype(np.float32)))))
    if crop == "subject":
        np.savez(boxes_file, boxes=np.array(box_cache, dtype=object))
    features = np.concatenate(out)
    np.savez(file, images=np.array(rows.Image), features=features)
    return features


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def projections(extra: np.ndarray, ids: np.ndarray) -> dict:
    mean = extra.mean(axis=0)
    u, s, vt = np.linalg.svd(extra - mean, full_matrices=False)
    k = min(PCA_DIMS, len(s) - 1)
    pca_w = vt[:k].T / (s[:k] / np.sqrt(len(extra)))
    xs = (extra - mean) @ pca_w
    # LDA in the whitened PCA space: within-id scatter, shrunk, then between-id directions
    labels, inverse = np.unique(ids, return_inverse=True)
    centres = np.stack([xs[inverse == c].mean(axis=0) for c in range(len(labels))])
    within = xs - centres[inverse]
    sw = within.T @ within / len(xs)
    sw = (1 - SHRINK) * sw + SHRINK * np.trace(sw) / len(sw) * np.eye(len(sw))
    ew, ev = np.linalg.eigh(sw)
    white = ev / np.sqrt(ew)
    cb = (centres - centres.mean(axis=0)) @ white
    _, _, bt = np.linalg.svd(cb, full_matrices=False)
    lda = white @ bt[:min(LDA_DIMS, len(bt))].T
    return {"raw": lambda x: x,
            "pca-w": lambda x: (x - mean) @ pca_w,
            "lda": lambda x: ((x - mean) @ pca_w) @ lda}


def top1(gallery, g_ids, queries, q_ids) -> float:
    best = g_ids[np.argmax(unit(queries) @ unit(gallery).T, axis=1)]
    return float(np.mean(best == q_ids))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--backbones", default="EfficientNetLite0")
    ap.add_argument("--sizes", default="224,320")
    ap.add_argument("--crops", default="whole,subject")
    ap.add_argument("--cache", type=Path, default=None, help="default: DATA/../probe_cache")
    args = ap.parse_args(argv)
    cache = args.cache or args.data.parent / f"probe_cache_{args.data.name}"
    cache.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(args.data / "train.csv", dtype=str, keep_default_na=False)
    extra_ids = set(pd.read_csv(args.data / "train_only.csv", dtype=str).Id)
    solution = pd.read_csv(args.data / "solution.csv", dtype=str, keep_default_na=False)
    queries = solution[solution.Id != NEW_WHALE].assign(folder="test")
    train = train[train.Id != NEW_WHALE].assign(folder="train")
    rows = pd.concat([train, queries], ignore_index=True)
    is_extra = rows.Id.isin(extra_ids).to_numpy() & (rows.folder == "train").to_numpy()
    is_gallery = ~rows.Id.isin(extra_ids).to_numpy() & (rows.folder == "train").to_numpy()
    is_query = (rows.folder == "test").to_numpy()
    ids = rows.Id.to_numpy()
    print(f"{args.data}: gallery {is_gallery.sum()} photos of {len(set(ids[is_gallery]))} ids, {is_query.sum()} "
          f"queries, train-only {is_extra.sum()} photos of {len(set(ids[is_extra]))} ids "
          f"(chance {1 / len(set(ids[is_gallery])):.3f})", flush=True)
    for backbone in args.backbones.split(","):
        for size in map(int, args.sizes.split(",")):
            for crop in args.crops.split(","):
                t = time.time()
                f = embed(args.data, rows, backbone, size, crop, cache)
                proj = projections(f[is_extra], ids[is_extra])
                cells = [f"{name} {top1(p(f[is_gallery]), ids[is_gallery], p(f[is_query]), ids[is_query]):.3f}"
                         for name, p in proj.items()]
                print(f"{backbone} {size} px {crop:7s}: closed-set top-1 " + ", ".join(cells) +
                      f"  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
