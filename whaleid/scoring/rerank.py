"""Re-ranking the embedding's top ids by local-feature verification, fused with the embedding score.

For a query and each of its `rerank.candidates` best ids by the embedding: descriptor matches
(keypoints.py's features) against each gallery photo of that id, Lowe's ratio test, then RANSAC
geometric verification (a homography, or a similarity transform); the id's local score is the inlier
count of its best photo (with predict.mirror_is_same and train.flip_ids, of the query's mirror image
too). This is what HotSpotter-style photo-ID does; the embedding alone misses what SIFT sees.

Fusion as WildFusion (Cermak et al. 2024): each score is mapped to a match probability by a logistic
fit on validation (query, candidate id) pairs, same id or not, and the two probabilities are
averaged. Evaluate fits it (never on test photos) and writes calibration.json; predict reads it.
The new_whale threshold then works on the fused score.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from ..pipeline.stage import StageError
from ..preprocess.augment import FLIP
from ..preprocess.keypoints import Store, as_float, binary, store_path
from ..ranking import submission

MIN_MATCHES = 6   # fewer ratio-test matches: no RANSAC, 0 inliers (4 fit any homography exactly: noise)
BLOCK = 64        # gallery photos per matrix product (64 x 300 keypoints: ~10 MB of similarities)


# ---------------------------------------------------------------- matching two photos

def ratio_matches(dq: np.ndarray, dg: np.ndarray, is_binary: bool, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, gallery indices) of the matches that pass Lowe's ratio test: the nearest gallery
    descriptor is closer than `ratio` times the second nearest; one match per gallery keypoint."""
    if len(dq) < 1 or len(dg) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    if not is_binary:
        return ratio_test(dq @ dg.T, ratio)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(dq, dg, k=2)
    got = [(m[0].queryIdx, m[0].trainIdx, m[0].distance) for m in pairs
           if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    if not got:
        return np.zeros(0, int), np.zeros(0, int)
    qi, gi, dist = (np.array(c) for c in zip(*got))
    return _one_per_gallery_point(qi, gi, dist)


def ratio_test(sim: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """ratio_matches from the cosine similarities (query keypoints x one photo's) of unit vectors:
    squared distance = 2 - 2 cos. Two argmax passes, not a partition: this is the hot loop."""
    if sim.shape[1] < 2:
        return np.zeros(0, int), np.zeros(0, int)
    rows = np.arange(len(sim))
    first = sim.argmax(1)
    s1 = sim[rows, first]
    rest = sim.copy()
    rest[rows, first] = -2.0
    s2 = rest.max(1)
    d1, d2 = np.sqrt(np.maximum(0, 2 - 2 * s1)), np.sqrt(np.maximum(0, 2 - 2 * s2))
    keep = d1 < ratio * d2
    return _one_per_gallery_point(np.flatnonzero(keep), first[keep], d1[keep])


def _one_per_gallery_point(qi, gi, dist) -> tuple[np.ndarray, np.ndarray]:
    if len(gi) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    order = np.argsort(dist, kind="stable")
    _, first_of = np.unique(gi[order], return_index=True)  # the closest match of each gallery keypoint
    pick = order[first_of]
    return np.asarray(qi)[pick].astype(int), np.asarray(gi)[pick].astype(int)


def verify(qxy: np.ndarray, gxy: np.ndarray, geometry: str, px: float) -> np.ndarray:
    """Inlier mask of the matched points under one RANSAC transform (all False when none is found)."""
    if geometry == "none":  # no verification: every ratio-test match counts (HotSpotter-like scoring)
        return np.ones(len(qxy), bool)
    if len(qxy) < MIN_MATCHES:
        return np.zeros(len(qxy), bool)
    src, dst = np.float32(qxy).reshape(-1, 1, 2), np.float32(gxy).reshape(-1, 1, 2)
    if geometry == "homography":
        # USAC_FAST (LO-RANSAC with SPRT): the same inliers as plain RANSAC on true pairs, ~10x faster on the
        # many false pairs, where plain RANSAC runs all its iterations (scripts/bench_rerank.py)
        _, mask = cv2.findHomography(src, dst, cv2.USAC_FAST, px, maxIters=1000, confidence=0.99)
    else:
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=px,
                                              maxIters=1000, confidence=0.99)
    return np.zeros(len(qxy), bool) if mask is None else mask.ravel().astype(bool)


@dataclass(frozen=True)
class Matcher:
    """The settings of one comparison: descriptor kind, ratio test, RANSAC model and threshold."""
    is_binary: bool
    ratio: float = 0.8
    geometry: str = "homography"
    px: float = 12.0

    def prepare(self, desc: np.ndarray) -> np.ndarray:
        return desc if self.is_binary else as_float(desc)

    def match(self, q: tuple, g: tuple) -> tuple[int, np.ndarray, np.ndarray]:
        """(inliers, query points, gallery points of the inliers) of two photos' (points, prepared desc)."""
        qi, gi = ratio_matches(q[1], g[1], self.is_binary, self.ratio)
        qxy, gxy = q[0][qi], g[0][gi]
        mask = verify(qxy, gxy, self.geometry, self.px)
        return int(mask.sum()), qxy[mask], gxy[mask]


# ---------------------------------------------------------------- a query against candidate ids

class Reranker:
    """Local scores of a query's candidate ids against their gallery photos (features from a Store)."""

    def __init__(self, store: Store, photos_of: dict[str, list[str]], matcher: Matcher, candidates: int,
                 mirror: bool):
        self.store, self.photos_of, self.matcher = store, photos_of, matcher
        self.candidates, self.mirror = candidates, mirror and store.mirrored
        self._cache: dict = {}

    def features(self, image: str, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        pts, desc = self.store.get(image, mirror)
        return pts, self.matcher.prepare(desc)

    def best(self, query: str, ident: str | None, photos: list[str] | None = None):
        """(inliers, gallery photo, mirrored query?, query points, photo points) of the id's best photo
        (or of the best of `photos`)."""
        views = [self.features(query)] + ([self.features(query, True)] if self.mirror else [])
        out = (0, None, False, np.zeros((0, 2)), np.zeros((0, 2)))
        for photo in self.photos_of.get(ident, []) if photos is None else photos:
            if photo == query:
                continue  # a validation photo is never its own gallery photo (split keeps them apart)
            g = self.features(photo)
            for mirrored, q in enumerate(views):
                n, qxy, gxy = self.matcher.match(q, g)
                if n > out[0]:
                    out = (n, photo, bool(mirrored), qxy, gxy)
        return out

    def scores(self, job) -> np.ndarray:
        """Worker: (query, ranked ids) -> inliers of the first `candidates` ids (0 for the rest)."""
        query, ids = job
        out = np.zeros(len(ids), np.float32)
        if query not in self.store:
            return out
        pairs = [(i, photo) for i, ident in enumerate(ids[: self.candidates])
                 for photo in self.photos_of.get(ident, []) if photo != query]
        if self.matcher.is_binary:  # Hamming matching, photo by photo
            for i, photo in pairs:
                out[i] = max(out[i], self.best(query, ident=None, photos=[photo])[0])
            return out
        views = [self.features(query)] + ([self.features(query, True)] if self.mirror else [])
        for start in range(0, len(pairs), BLOCK):  # one product per block of photos: BLAS, not Python
            block = pairs[start:start + BLOCK]
            feats = [self.features(photo) for _, photo in block]
            ends = np.cumsum([len(f[1]) for f in feats])
            gallery = np.concatenate([f[1] for f in feats])
            for q in views:
                sim = q[1] @ gallery.T if len(q[1]) else np.zeros((0, len(gallery)), np.float32)
                for (i, _), f, end in zip(block, feats, ends):
                    qi, gi = ratio_test(sim[:, end - len(f[1]):end], self.matcher.ratio)
                    mask = verify(q[0][qi], f[0][gi], self.matcher.geometry, self.matcher.px)
                    out[i] = max(out[i], mask.sum())
        return out


def for_run(run, photos, stages=("keypoints",)) -> Reranker:
    """The Reranker of an evaluate / predict run; `photos`: a table of gallery photos (Image, Id);
    `stages`: the keypoint stages whose features it reads (predict: the test photos' too)."""
    store = Store(*(store_path(run.session, s) for s in stages))
    photos_of: dict[str, list[str]] = {}
    for image, ident in zip(photos.Image, photos.Id):
        photos_of.setdefault(str(ident), []).append(str(image))
    matcher = Matcher(binary(store.method), run.setting("rerank.ratio"), run.setting("rerank.geometry"),
                      run.setting("rerank.ransac_px"))
    mirror = run.setting("train.flip_ids") and run.setting("predict.mirror_is_same")
    return Reranker(store, photos_of, matcher, run.setting("rerank.candidates"), mirror)


def local_scores(run, reranker: Reranker, queries: list[str], rankings: list) -> list[np.ndarray]:
    """Inlier counts per query's ranked ids, over --workers threads (matching and RANSAC free the GIL)."""
    jobs = [(q, list(labels)) for q, (labels, _) in zip(queries, rankings)]
    return list(run.map(partial(Reranker.scores, reranker), jobs, "verify local features", chunksize=4))


# ---------------------------------------------------------------- calibration and fusion

def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def fit_logistic(x, y, l2: float = 1e-2, iters: int = 50) -> tuple[float, float]:
    """(a, b) of P(same | x) = sigmoid(a x + b), by Newton's method with a small ridge on a (so that
    separable data still gives finite weights); one class only: a = 0 and b its clipped log odds."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    prior = float(np.clip(y.mean() if len(y) else 0.5, 1e-3, 1 - 1e-3))
    if len(y) == 0 or y.min() == y.max():
        return 0.0, float(np.log(prior / (1 - prior)))
    X = np.stack([x, np.ones_like(x)], axis=1)
    w = np.array([0.0, np.log(prior / (1 - prior))])
    ridge = np.diag([l2, 1e-9])
    for _ in range(iters):
        p = sigmoid(X @ w)
        grad = X.T @ (p - y) + ridge @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def local_feature(inliers):
    return np.log1p(np.asarray(inliers, np.float64))


@dataclass(frozen=True)
class Fusion:
    """Two calibrations (a, b) and their average: what a (query, id) pair's fused score is."""
    embedding: tuple[float, float]
    local: tuple[float, float]
    pairs: int = 0
    same: int = 0

    def p_embedding(self, scores):
        return sigmoid(self.embedding[0] * np.asarray(scores, np.float64) + self.embedding[1])

    def p_local(self, inliers):
        return sigmoid(self.local[0] * local_feature(inliers) + self.local[1])

    def fused(self, scores, inliers) -> np.ndarray:
        return 0.5 * (self.p_embedding(scores) + self.p_local(inliers))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Fusion":
        return cls(tuple(data["embedding"]), tuple(data["local"]), int(data.get("pairs", 0)), int(data.get("same", 0)))

    @classmethod
    def read(cls, path: Path) -> "Fusion":
        return cls.from_json(json.loads(Path(path).read_text()))


def pairs(rankings: list, inliers: list, truths: list[str], candidates: int):
    """(embedding scores, inliers, same?) of every (query, verified candidate id) pair."""
    e, n, y = [], [], []
    for (labels, scores), counts, truth in zip(rankings, inliers, truths):
        m = min(candidates, len(labels))
        e += list(scores[:m])
        n += list(counts[:m])
        y += [lab == truth for lab in labels[:m]]
    return np.array(e, np.float64), np.array(n, np.float64), np.array(y, bool)


def fit(rankings: list, inliers: list, truths: list[str], candidates: int) -> Fusion:
    """The fusion fitted on labelled (validation) queries: new whales too, as negatives only."""
    e, n, y = pairs(rankings, inliers, truths, candidates)
    return Fusion(fit_logistic(e, y), fit_logistic(local_feature(n), y), int(len(y)), int(y.sum()))


def fused_ranking(ranking: tuple, inliers: np.ndarray, fusion: Fusion, k: int) -> tuple[list[str], list[float]]:
    """The ids re-ranked by fused score (ids past the verified ones count 0 inliers), k best."""
    labels, scores = ranking
    counts = np.zeros(len(labels))
    counts[: len(inliers)] = inliers[: len(labels)]
    fused = fusion.fused(scores, counts)
    order = np.argsort(-fused, kind="stable")[:k]
    return [labels[i] for i in order], [float(fused[i]) for i in order]


def cross_fitted(rankings: list, inliers: list, truths: list[str], names: list[str], candidates: int,
                 k: int) -> list[tuple[list[str], list[float]]]:
    """Re-ranked validation queries, each scored by a fusion fitted on the other half of the queries
    (2-fold, halves by photo name), so evaluate's figures are not measured on the pairs they were fit on."""
    fold = np.array([zlib.crc32(n.encode()) % 2 for n in names], int)
    out: list = [None] * len(rankings)
    for f in (0, 1):
        train = np.flatnonzero(fold != f)
        fusion = fit([rankings[i] for i in train], [inliers[i] for i in train], [truths[i] for i in train], candidates)
        for i in np.flatnonzero(fold == f):
            out[i] = fused_ranking(rankings[i], inliers[i], fusion, k)
    return out


# ---------------------------------------------------------------- evaluate and predict

def summary_line(r: dict) -> str:
    """evaluate's line on what re-ranking buys (metrics.json's "rerank")."""
    a, b = r["without"], r["with"]
    return (f"  re-ranking {r['candidates']} ids by local features: best MAP@5 {a['map5']:.4f} -> {b['map5']:.4f}, "
            f"closed-set top-1 {a['closed_top1']} -> {b['closed_top1']} (cross-fitted on validation halves)")


def evaluated(run, probs: list, classes, truths: list[str], names: list[str], gallery, merge: str, k: int):
    """evaluate: (re-ranked validation queries (cross-fitted), the fusion fitted on all of them, as JSON).
    `gallery`: the training split's files (File, Image, Id), whose photos are the candidates' photos."""
    c = run.setting("rerank.candidates")
    deep = [submission.ranked(p, classes, merge, max(k, c)) for p in probs]
    photos = gallery[~gallery.Id.str.endswith(FLIP)].drop_duplicates("Image")
    inliers = local_scores(run, for_run(run, photos), names, deep)
    fusion = fit(deep, inliers, truths, c)
    run.echo(f"rerank: fusion fitted on {fusion.pairs} validation (query, id) pairs, {fusion.same} of the same id: "
             f"embedding {fusion.embedding[0]:.2f}x{fusion.embedding[1]:+.2f}, "
             f"local {fusion.local[0]:.2f}x log(1+inliers){fusion.local[1]:+.2f}")
    return cross_fitted(deep, inliers, truths, names, c, k), {"method": "local", **fusion.to_json()}


def for_predict(run, calibration: Path, photos):
    """predict: a function re-ranking a chunk of scored test photos [(image, ranking, error, top)] by
    evaluate's fusion (never fitted here: test photos have no labels to fit on)."""
    try:
        data = json.loads(Path(calibration).read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("method") != "local":
        raise StageError(f"rerank.method = local fuses scores by the calibration evaluate fits on validation, and "
                         f"{calibration} has none: run whaleid evaluate with the same settings first")
    fusion, k = Fusion.from_json(data), run.setting("predict.top_k")
    reranker = for_run(run, photos, ("keypoints", "test_keypoints"))

    def apply(scored: list) -> list:
        ok = [i for i, s in enumerate(scored) if s[2] is None]
        counts = local_scores(run, reranker, [scored[i][0] for i in ok], [scored[i][1] for i in ok])
        out = list(scored)
        for i, n in zip(ok, counts):
            ranking = fused_ranking(scored[i][1], n, fusion, k)
            out[i] = (scored[i][0], ranking, None, ranking[1][0] if ranking[1] else 0.0)
        return out
    return apply
