"""Closed-set top-1 of re-ID without training: frozen ImageNet EfficientNet-Lite0 features (1-NN) and
SIFT matching, on a data folder made by `whaleid import-folders` (or scripts/bench_reid.py's
WORK/data): the answer for each test photo of a known individual is the id of its best train photo.
It prints the protocol: bench_reid's default data folder keeps encounters apart (a test photo never
meets its own sighting among the train photos); a `--leaky` one does not.

    python scripts/probe_reid_features.py --data /tmp/whaleid-bench-reid-nyala-EfficientNetLite0-imagenet/data
                                          [--sizes 224,320,448] [--sift-side 480] [--no-sift]
                                          [--local sift:ratio,xfeat:mutual,xfeat:lighterglue,aliked:lightglue] [--points 1000]
                                          [--mask] [--shortlist 30] [--glue-confidence 0.7]

What it tells: how much of the identity is in the generic features before any fine-tuning, per input
size, layer (the last layer of three late blocks and the 1280-channel head), pooling (average, GeM
p=3, max) and aspect (squashed to a square, or padded), and in local SIFT matches (RootSIFT, ratio
test 0.8; the id of the photo with the most RANSAC-homography inliers, or the most ratio-test matches).
--local runs whaleid's own extractors and matchers (keypoints.method:rerank.matcher, as re-ranking
uses them; whole photos, --sift-side px, --points keypoints) the same way, each alone: the id of the
photo with the most matches, and with the most homography inliers (12 px). LighterGlue costs ~50 ms a
pair (ALIKED's LightGlue ~4x), so each compares a query with the --shortlist photos that mutual
matching of the same descriptors ranks best.
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

from whaleid.data.tables import NEW_WHALE, read_encounters  # noqa: E402

LAYERS = {"head": "head_relu", "block10": "block10_add", "block14": "block14_add", "block15": "block15_project_bn"}


def photo(path: Path, size: int, pad: bool) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    if not pad:
        return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    out = np.full((size, size, 3), 127, np.uint8)
    y, x = (size - rgb.shape[0]) // 2, (size - rgb.shape[1]) // 2
    out[y:y + rgb.shape[0], x:x + rgb.shape[1]] = rgb
    return out


POOL = {"avg": lambda a: a.mean((1, 2)), "max": lambda a: a.max((1, 2)),
        "gem": lambda a: np.mean(np.maximum(a, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)}


def cnn(data: Path, gallery: pd.DataFrame, queries: pd.DataFrame, sizes: list[int]) -> None:
    import keras
    from whaleid.backbones import efficientnet_lite as lite
    for size in sizes:
        base = lite.build(size, "imagenet")
        net = keras.Model(base.input, [base.get_layer(n).output for n in LAYERS.values()])
        for pad in (False, True):
            t = time.time()
            embed = lambda files, folder: net.predict(lite.preprocess_input(np.stack(  # noqa: E731
                [photo(data / folder / f, size, pad) for f in files]).astype(np.float32)), batch_size=16, verbose=0)
            G, Q = embed(gallery.Image, "train"), embed(queries.Image, "test")
            for layer, g, q in zip(LAYERS, G, Q):
                cells = []
                for name, pool in POOL.items():
                    gv, qv = pool(g), pool(q)
                    gv /= np.linalg.norm(gv, axis=1, keepdims=True)
                    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
                    best = gallery.Id.to_numpy()[np.argmax(qv @ gv.T, axis=1)]
                    cells.append(f"{name} {np.mean(best == queries.Id.to_numpy()):.3f}")
                print(f"frozen Lite0 {size} px {'padded' if pad else 'squashed'} {layer:8s}: " + ", ".join(cells))
            print(f"  ({time.time() - t:.0f} s)", flush=True)


def sift(data: Path, gallery: pd.DataFrame, queries: pd.DataFrame, side: int) -> None:
    detector, matcher = cv2.SIFT_create(nfeatures=1000), cv2.BFMatcher(cv2.NORM_L2)

    def features(path):
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        h, w = grey.shape
        scale = side / max(h, w)
        grey = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        points, desc = detector.detectAndCompute(grey, None)
        desc = np.sqrt(desc / (desc.sum(1, keepdims=True) + 1e-7)).astype(np.float32)  # RootSIFT
        return np.float32([p.pt for p in points]), desc

    t = time.time()
    G = [features(data / "train" / f) for f in gallery.Image]
    hits_inliers, hits_matches = [], []
    for image, truth in zip(queries.Image, queries.Id):
        qp, qd = features(data / "test" / image)
        inliers, matches = {}, {}
        for (gp, gd), ident in zip(G, gallery.Id):
            good = [a for a, b in matcher.knnMatch(qd, gd, k=2) if a.distance < 0.8 * b.distance]
            n_in = 0
            if len(good) >= 8:
                _, mask = cv2.findHomography(qp[[a.queryIdx for a in good]], gp[[a.trainIdx for a in good]],
                                             cv2.RANSAC, 12.0)
                n_in = int(mask.sum()) if mask is not None else 0
            inliers[ident] = max(inliers.get(ident, 0), n_in)
            matches[ident] = max(matches.get(ident, 0), len(good))
        hits_inliers.append(max(inliers, key=inliers.get) == truth)
        hits_matches.append(max(matches, key=matches.get) == truth)
    print(f"SIFT at {side} px: by RANSAC inliers {np.mean(hits_inliers):.3f}, by ratio-test matches "
          f"{np.mean(hits_matches):.3f} ({time.time() - t:.0f} s)")


def local(data: Path, gallery: pd.DataFrame, queries: pd.DataFrame, spec: str, side: int, points: int,
          shortlist: int, mask: bool = False, glue_confidence: float = 0.1) -> None:
    from whaleid.preprocess.keypoints import COLOUR, as_float, features
    from whaleid.preprocess.masks import animal_mask
    from whaleid.similarity.local import GLUES, SHORTLIST_SIMILARITY, Matcher, verify

    method, pairing = spec.split(":")
    t = time.time()

    def feats(path):
        colour = mask or method in COLOUR  # decoded in colour only when read so
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) if colour else None
        crop = rgb if method in COLOUR else cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        h, w = crop.shape[:2]
        scale = side / max(h, w)
        crop = cv2.resize(crop, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        on = animal_mask(rgb)[0] if mask else None
        pts, desc = features(crop, method, points, on)
        return pts.astype(np.float32), as_float(desc) if method != "orb" else desc, crop.shape[1::-1]

    G = [feats(data / "train" / f) for f in gallery.Image]
    ids = gallery.Id.to_numpy()
    matcher = Matcher(method == "orb", 0.8, "none", 12.0, pairing, 0.82, glue_confidence)
    # no embedding here: mutual matches rank every extractor's shortlist (ALIKED's descriptors: cosine over 0.5)
    similarity = SHORTLIST_SIMILARITY.get(method, 0.5)
    coarse = Matcher(False, 0.8, "none", 12.0, "mutual", similarity) if pairing in GLUES else None
    hits = {"matches": [], "inliers": []}
    for image, truth in zip(queries.Image, queries.Id):
        q = feats(data / "test" / image)
        order = range(len(G))
        if coarse is not None:  # the glue matcher on the shortlist only
            order = np.argsort([-coarse.match(q, g)[0] for g in G], kind="stable")[:shortlist]
        best = {"matches": np.zeros(len(G)), "inliers": np.zeros(len(G))}
        for i in order:
            n, qxy, gxy = matcher.match(q, G[i])
            best["matches"][i] = n
            best["inliers"][i] = verify(qxy, gxy, "homography", 12.0).sum() if n else 0
        for key in hits:
            hits[key].append(ids[int(np.argmax(best[key]))] == truth)
    extra = f", {pairing} on the {shortlist} photos with most mutual matches" if coarse is not None else ""
    extra += f", matches above {glue_confidence}" if pairing in GLUES else ""
    extra += ", keypoints on the animal's mask only" if mask else ", whole photo"
    print(f"{method} + {pairing} at {side} px, {points} points{extra}: by matches {np.mean(hits['matches']):.3f}, "
          f"by RANSAC inliers {np.mean(hits['inliers']):.3f} ({time.time() - t:.0f} s)", flush=True)


def protocol(data: Path, gallery: pd.DataFrame, queries: pd.DataFrame) -> str:
    """Whether a query can meet its own encounter among the train photos (the data folder's encounters.csv:
    `whaleid import-folders --encounter`, or scripts/bench_reid.py's default, keeps them apart; --leaky
    does not write one)."""
    enc = read_encounters(data)
    if not enc:
        return "leaky or unknown (no encounters.csv): a test photo may share its encounter with train photos"
    shared = set(enc.get(i, i) for i in gallery.Image)
    n = sum(enc.get(i, i) in shared for i in queries.Image)
    return f"encounters known: {n} of {len(queries)} test photos share an encounter with a train photo"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="train.csv, solution.csv, train/, test/")
    ap.add_argument("--sizes", default="224,320,448")
    ap.add_argument("--sift-side", type=int, default=480)
    ap.add_argument("--no-sift", action="store_true")
    ap.add_argument("--no-cnn", action="store_true")
    ap.add_argument("--local", default="", help="comma-separated keypoints.method:rerank.matcher, e.g. xfeat:mutual")
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--mask", action="store_true", help="--local: keypoints on the animal's mask only (keypoints.mask)")
    ap.add_argument("--shortlist", type=int, default=30)
    ap.add_argument("--glue-confidence", type=float, default=0.1,
                    help="--local learned matchers: only matches above this probability (rerank.glue_confidence)")
    ap.add_argument("--known-only", action="store_true",
                    help="the gallery holds the tested individuals only (train_only.csv's left out), as "
                         "bench_reid's closed-set top-1 counts them")
    args = ap.parse_args(argv)
    gallery = pd.read_csv(args.data / "train.csv", dtype=str, keep_default_na=False)
    gallery = gallery[gallery.Id != NEW_WHALE].reset_index(drop=True)
    if args.known_only and (args.data / "train_only.csv").is_file():
        only = set(pd.read_csv(args.data / "train_only.csv", dtype=str).Id)
        gallery = gallery[~gallery.Id.isin(only)].reset_index(drop=True)
    solution = pd.read_csv(args.data / "solution.csv", dtype=str, keep_default_na=False)
    queries = solution[solution.Id != NEW_WHALE].reset_index(drop=True)
    print(f"{args.data}: {len(gallery)} train photos of {gallery.Id.nunique()} ids, {len(queries)} test photos of "
          f"known ids; closed-set top-1 (chance {1 / gallery.Id.nunique():.3f}):")
    print("protocol: " + protocol(args.data, gallery, queries))
    if not args.no_cnn:
        cnn(args.data, gallery, queries, [int(s) for s in args.sizes.split(",")])
    if not args.no_sift:
        sift(args.data, gallery, queries, args.sift_side)
    for spec in filter(None, args.local.split(",")):
        local(args.data, gallery, queries, spec, args.sift_side, args.points, args.shortlist, args.mask,
              args.glue_confidence)


if __name__ == "__main__":
    main()
