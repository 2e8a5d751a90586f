"""Dedup speed: the original algorithm vs whaleid's dedup stage, on N synthetic photos, in one run.

    python scripts/bench_dedup.py [--images 3000] [--workers 2] [--pairs-sample 600]

(a) the original: full decode + imagehash.phash of every photo (one process), then a Python double
    loop `h1 - h2 <= 6` over all pairs of hashes (timed on a sample and extrapolated: it is quadratic);
(b) whaleid's dedup stage (reduced-size decode in --workers processes, vectorised exact pair search,
    pixel verification, grouping, relabelling);
(c) decoding the same photos at the reduced size only, one process: the floor of hashing. The hash
    reads grey pixels, so whaleid decodes only the luma of a colour JPEG; the floor decodes the same
    way (an RGB decode at the same size is printed beside it).
Both pair searches are extrapolated to 33,321 photos (the Kaggle train + test count).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from whaleid.pipeline import config  # noqa: E402
from whaleid.data import images
from whaleid.preprocess import dedup
from whaleid.datasets import synth
from whaleid.stages import ALL  # noqa: E402
from whaleid.pipeline.stage import Session  # noqa: E402

KAGGLE = 33321


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs-sample", type=int, default=600, help="hashes in the timed sample of the double loop")
    ap.add_argument("--data", type=Path, help="reuse a synthetic data folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="whaleid-bench-dedup-"))
    data = args.data
    if data is None:
        data = tmp / "data"
        ids = max(10, args.images // 12)
        print(f"generating ~{args.images} synthetic photos (ids {ids}) ...", flush=True)
        synth.generate(data, ids=ids, seed=0, workers=args.workers, photos="uniform:6", progress=False)
    paths = sorted((data / "train").glob("*.jpg")) + sorted((data / "test").glob("*.jpg"))
    n = len(paths)
    print(f"{n} photos in {data}; workers {args.workers}; max_distance 6, verify on")

    t = time.perf_counter()
    hashes = [imagehash.phash(Image.open(p)) for p in paths]
    t_hash_orig = time.perf_counter() - t
    m = min(args.pairs_sample, n)
    sample = hashes[:m]
    t = time.perf_counter()
    found = 0
    for i, h1 in enumerate(sample):
        for h2 in sample[i + 1:]:
            if h1 - h2 <= 6:
                found += 1
    per_pair = (time.perf_counter() - t) / (m * (m - 1) / 2)
    orig_pairs_n = per_pair * n * (n - 1) / 2
    orig_pairs_k = per_pair * KAGGLE * (KAGGLE - 1) / 2

    t = time.perf_counter()
    for p in paths:
        images.open_image(p, draft_size=dedup.HASH_DRAFT)
    t_floor_rgb = time.perf_counter() - t
    t = time.perf_counter()
    for p in paths:
        images.open_image(p, draft_size=dedup.HASH_DRAFT, grey=True)
    t_floor = time.perf_counter() - t
    t = time.perf_counter()
    for p in paths:
        dedup.hash_image(p)
    t_hash_one = time.perf_counter() - t

    rng = np.random.default_rng(0)
    h = np.array([int(str(x), 16) for x in hashes], dtype=np.uint64)
    big = np.concatenate([h, rng.integers(0, 2 ** 63, size=max(0, KAGGLE - n), dtype=np.uint64)])
    t = time.perf_counter()
    dedup.near_pairs(big, 6)
    t_search_k = time.perf_counter() - t

    s = Session(cfg=config.load(None), work=tmp / "work", data=data, stages=ALL,
                workers=args.workers, progress=False, echo=lambda msg: None)
    t = time.perf_counter()
    s.run([s.stage("dedup")])
    t_stage = time.perf_counter() - t
    counts = s.manifest("dedup")["counts"]

    per_photo_orig = t_hash_orig / n
    per_photo_stage = t_stage / n
    orig_k = per_photo_orig * KAGGLE + orig_pairs_k
    stage_k = per_photo_stage * KAGGLE + t_search_k
    print(f"(a) original: phash {t_hash_orig:.1f}s ({1000 * per_photo_orig:.1f} ms/photo), "
          f"double loop {1e6 * per_pair:.2f} us/pair -> {orig_pairs_n:.1f}s for {n} photos, "
          f"{orig_pairs_k / 60:.1f} min at {KAGGLE}")
    print(f"(b) whaleid dedup stage: {t_stage:.1f}s for {n} photos ({1000 * per_photo_stage:.2f} ms/photo "
          f"with {args.workers} workers; groups {counts['groups']}), exact pair search over {KAGGLE} hashes "
          f"{t_search_k:.2f}s")
    print(f"(c) reduced-size luma decode only, 1 process: {t_floor:.1f}s ({1000 * t_floor / n:.2f} ms/photo; "
          f"RGB at the same size {1000 * t_floor_rgb / n:.2f} ms/photo); "
          f"whaleid hashing, 1 process: {t_hash_one:.1f}s ({1000 * t_hash_one / n:.2f} ms/photo)")
    print(f"pair search speed-up at {KAGGLE} images: {orig_pairs_k / t_search_k:.0f}x")
    print(f"dedup stage speed-up at {KAGGLE} images: {orig_k / stage_k:.0f}x")
    print(f"hashing vs reduced-decode floor: {t_hash_one / t_floor:.2f}x")


if __name__ == "__main__":
    main()
