"""The learned local features' cost on this machine (issue 35): per photo (the CNN, then keypoints and
descriptors) and per pair (mutual nearest neighbours, and the glue matcher), for XFeat + LighterGlue
and ALIKED + LightGlue, on real nyala photos when ../shared is there, else on textures.
scripts/gpu_check.py runs the same timing on a GPU.

    python scripts/bench_xfeat.py [--photos 20] [--side 640] [--top-k 1000] [--glue-pairs 20]
                                  [--extractors xfeat,aliked]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from whaleid.backbones import aliked, lightglue, xfeat  # noqa: E402
from whaleid.similarity.local import mutual_test  # noqa: E402


def photos(n: int, side: int) -> list[np.ndarray]:
    files = sorted((ROOT.parent / "shared" / "data" / "nyala").rglob("*.jpg"))[:n]
    if not files:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 255, (side * 3 // 4, side, 3), dtype=np.uint8) for _ in range(n)]
    out = []
    for f in files:
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        s = side / max(img.shape[:2])
        h, w = (int(img.shape[0] * s) // 32 * 32, int(img.shape[1] * s) // 32 * 32)
        out.append(cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA))
    return out


def _timings(label: str, images: list, dense, sparse, glue, top_k: int, glue_pairs: int) -> str:
    """One line: ms per photo (`dense` maps, then `sparse` keypoints + descriptors) and per pair (mutual
    NN, the `glue` matcher); dense(image) -> maps, sparse(maps, top_k) -> (points, scores, descriptors)."""
    dense(images[0])  # trace once
    t = time.perf_counter()
    maps = [dense(img) for img in images]
    cnn = (time.perf_counter() - t) / len(images)
    t = time.perf_counter()
    found = [sparse(m, top_k) for m in maps]
    det = (time.perf_counter() - t) / len(images)
    t, pairs = time.perf_counter(), 0
    for a in found:
        for b in found:
            mutual_test(a[2] @ b[2].T, 0.82)
            pairs += 1
    match = (time.perf_counter() - t) / pairs
    size = lambda i: np.float32(images[i].shape[1::-1])  # noqa: E731
    glue.match(found[0][0], found[0][2], size(0), found[1][0], found[1][2], size(1))  # trace once
    t = time.perf_counter()
    for k in range(glue_pairs):
        a, b = k % len(found), (k + 1) % len(found)
        glue.match(found[a][0], found[a][2], size(a), found[b][0], found[b][2], size(b))
    glued = (time.perf_counter() - t) / max(glue_pairs, 1)
    sizes = sorted({img.shape[:2] for img in images})
    return (f"{label}: {len(images)} photos at {sizes[0]}..{sizes[-1]}, top_k {top_k}: dense maps {cnn * 1000:.0f} ms, "
            f"keypoints + descriptors {det * 1000:.0f} ms a photo ({np.mean([len(f[0]) for f in found]):.0f} keypoints); "
            f"mutual nearest neighbours {match * 1000:.2f} ms a pair ({pairs} pairs); glue matcher "
            f"{glued * 1000:.1f} ms a pair ({glue_pairs} pairs)")


def timings(n_photos: int = 20, side: int = 640, top_k: int = 1000, glue_pairs: int = 20) -> str:
    """XFeat's CNN and keypoints, mutual NN and LighterGlue."""
    net = xfeat.build(3, xfeat.read_weights())
    return _timings("XFeat + LighterGlue", photos(n_photos, side),
                    lambda img: net.predict_on_batch(img[None].astype(np.float32)),
                    lambda maps, k: xfeat.detect(*(m[0] for m in maps), top_k=k),
                    lightglue.lighterglue(), top_k, glue_pairs)


def aliked_timings(n_photos: int = 20, side: int = 640, top_k: int = 1000, glue_pairs: int = 20) -> str:
    """ALIKED's dense maps and keypoints (score over the keypoints stage's least), mutual NN and LightGlue."""
    from whaleid.preprocess.keypoints import ALIKED_MIN_SCORE
    net = aliked.ALIKED()

    def sparse(maps, k):
        points, scores = aliked.detect(maps[1], k, ALIKED_MIN_SCORE)
        return points, scores, net.descriptors.describe(maps[0], points)
    return _timings("ALIKED-n16 + LightGlue", [img.astype(np.float32) / 255 for img in photos(n_photos, side)],
                    net.dense, sparse, lightglue.aliked_lightglue(), top_k, glue_pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=20)
    ap.add_argument("--side", type=int, default=640)
    ap.add_argument("--top-k", type=int, default=1000)
    ap.add_argument("--glue-pairs", type=int, default=20)
    ap.add_argument("--extractors", default="xfeat,aliked")
    args = ap.parse_args(argv)
    for name in args.extractors.split(","):
        run = {"xfeat": timings, "aliked": aliked_timings}[name]
        print(run(args.photos, args.side, args.top_k, args.glue_pairs), flush=True)


if __name__ == "__main__":
    main()
