"""Re-ranking's cost at Kaggle size (issue 23), measured on a fraction and extrapolated:

    python scripts/bench_rerank.py [--gallery 2000] [--queries 200] [--candidates 5,10,20,40] [--workers 2]
                                   [--method sift|orb|xfeat|aliked] [--matcher ratio|mutual|lighterglue|lightglue] [--max-points 300]
                                   [--glue-shortlist 30]
    (also: python scripts/bench_predict.py --kaggle-rerank ...)

The Kaggle 2019 test: 7,960 photos against 25,361 train photos (15,697 of 5,004 known ids). Local
features are computed per photo once (the keypoints / test_keypoints stages), and a query's matching
cost depends on its candidates' photos only, not on the gallery's size, so both extrapolate linearly:

1. features: the 31 real Kaggle photos (../shared/data/whales, their boxes) through the stages' own
   worker (decode, box crop, resize to keypoints.side, RootSIFT), timed per photo on one core;
2. a synthetic gallery of --gallery photos: real photos' crops under random similarity transforms
   (rotation, scale, shift) and brightness, their features stored as the stage stores them, spread
   over ids with the real Kaggle photo counts (kaggle2019_train.csv);
3. --queries queries, each with C candidate ids drawn uniformly or in proportion to their photo
   count (pessimistic: ids with many photos rank high more often), scored by Reranker.scores in
   --workers threads, as predict runs it.
Prints ms per photo pair, per query-candidate pair, per query, and the extrapolated minutes for 7,960
queries and for the 33,321 photos' features, on --workers cores, and identify's cost for a batch of
1,000 photos (their features + their matching, with the Kaggle photo counts per id: a catalogue with
more photos per id costs proportionally more).
"""
from __future__ import annotations

import argparse
import multiprocessing.pool
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from whaleid.preprocess import keypoints  # noqa: E402
from whaleid.similarity.local import Matcher, Reranker  # noqa: E402

WHALES = ROOT.parent / "shared" / "data" / "whales"
KAGGLE_TEST, KAGGLE_TRAIN = 7960, 25361


def real_crops(side: int, margin: float, method: str, max_points: int) -> tuple[list[np.ndarray], float]:
    """Grey crops of the real photos and the mean ms per photo of the stage's worker (features included)."""
    labels = pd.read_csv(WHALES / "labels.csv")
    crops, times = [], []
    for r in labels.itertuples():
        box = (r.x0, r.y0, r.x1, r.y1) if np.isfinite(r.x0) else (0, 0, r.width, r.height)
        box = tuple(int(v) for v in box)
        t = time.perf_counter()
        _, got, err = keypoints._one((r.Image, str(WHALES / "images" / r.Image), box), margin, side, method,
                                     max_points, False)
        times.append(time.perf_counter() - t)
        if err is None:
            crops.append(keypoints.crop_rgb(WHALES / "images" / r.Image, box, margin, side,
                                            grey=method not in keypoints.COLOUR))
    return crops, 1000 * float(np.median(times))


def warped(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = grey.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2 + rng.uniform(-20, 20), h / 2 + rng.uniform(-20, 20)),
                                rng.uniform(-15, 15), rng.uniform(0.8, 1.15))
    out = cv2.warpAffine(grey, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    return np.clip(out.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gallery", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", default="5,10,20,40")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--side", type=int, default=480)
    ap.add_argument("--max-points", type=int, default=300)
    ap.add_argument("--geometry", default="homography")
    ap.add_argument("--method", default="sift", choices=("sift", "orb", "xfeat", "aliked"))
    ap.add_argument("--matcher", default="ratio", choices=("ratio", "mutual", "lighterglue", "lightglue"))
    ap.add_argument("--glue-shortlist", type=int, default=30,
                    help="lighterglue: photos per query LighterGlue compares (rerank.glue_shortlist; 0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    keypoints.prepare(args.method)
    crops, ms_extract = real_crops(args.side, 0.05, args.method, args.max_points)
    print(f"settings: keypoints.method={args.method} rerank.matcher={args.matcher} keypoints.side={args.side} "
          f"keypoints.max_points={args.max_points} rerank.geometry={args.geometry} "
          f"rerank.glue_shortlist={args.glue_shortlist}, {args.workers} workers")
    print(f"features: {len(crops)} real Kaggle photos, median {ms_extract:.0f} ms per photo on one core (decode, "
          f"crop, {args.side} px, {args.method} {args.max_points}); {KAGGLE_TEST + KAGGLE_TRAIN} photos on {args.workers} "
          f"cores: {ms_extract * (KAGGLE_TEST + KAGGLE_TRAIN) / args.workers / 60000:.1f} min")
    results, t = [], time.perf_counter()
    for i in range(args.gallery + args.queries):
        grey = warped(crops[i % len(crops)], rng)
        pts, desc = keypoints.features(grey, args.method, args.max_points)
        results.append((f"p{i}", pts, desc, grey.shape[1::-1], None, None))
    print(f"synthetic photos: {len(results)} in {time.perf_counter() - t:.0f} s; median keypoints "
          f"{np.median([len(r[1]) for r in results]):.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keypoints.npz"
        np.savez(path, **keypoints.pack(results, args.method, False))
        store = keypoints.Store(path)
    counts = pd.read_csv(WHALES / "kaggle2019_train.csv").query("Id != 'new_whale'").Id.value_counts().to_numpy()
    gallery = [f"p{i}" for i in range(args.gallery)]
    photos_of = {f"id{j}": list(rng.choice(gallery, size=int(c), replace=False)) for j, c in enumerate(counts)}
    ids = np.array(list(photos_of))
    weight = counts / counts.sum()
    queries = [f"p{args.gallery + q}" for q in range(args.queries)]
    matcher = Matcher(keypoints.binary(args.method), 0.8, args.geometry, 12.0, args.matcher, 0.82)
    for draw in ("uniform", "by photo count"):
        for c in (int(x) for x in args.candidates.split(",")):
            jobs = [(q, list(rng.choice(ids, size=c, replace=False, p=None if draw == "uniform" else weight)))
                    for q in queries]
            pairs = sum(len(photos_of[i]) for _, cand in jobs for i in cand)
            reranker = Reranker(store, photos_of, matcher, c, False, glue_shortlist=args.glue_shortlist)
            t = time.perf_counter()
            with multiprocessing.pool.ThreadPool(args.workers) as pool:
                list(pool.imap(reranker.scores, jobs, chunksize=4))
            wall = time.perf_counter() - t
            per_query = 1000 * wall / len(jobs)
            print(f"candidates {c:3d} ({draw}): {pairs / len(jobs):6.1f} photo pairs per query; on {args.workers} "
                  f"cores {per_query:7.1f} ms per query, {per_query / c:6.2f} ms per query-candidate pair, "
                  f"{1000 * wall / pairs:5.2f} ms per photo pair; 7,960 queries: {per_query * KAGGLE_TEST / 60000:5.1f} min; "
                  f"identify 1,000 photos: {(ms_extract / args.workers + per_query) * 1000 / 60000:5.1f} min", flush=True)


if __name__ == "__main__":
    main()
