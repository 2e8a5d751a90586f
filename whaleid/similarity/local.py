"""Local matching: the embedding's top ids verified by local features (keypoints), as a re-ranking signal.

For a query and each of its `rerank.candidates` best ids by the embedding: descriptor matches
(keypoints.py's features) against each gallery photo of that id, Lowe's ratio test, then RANSAC
geometric verification (a homography, or a similarity transform); the id's local score is the inlier
count of its best photo (with predict.mirror_is_same and train.flip_ids, of the query's mirror image
too). This is what HotSpotter-style photo-ID does; the embedding alone misses what SIFT sees.
The inliers are fused with the embedding's score by similarity/fusion.py.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from functools import partial

import cv2
import numpy as np
import pandas as pd

from whaleid.preprocess.keypoints import Store, as_float, binary
from whaleid.similarity.fusion import Fusion, choose, cross_fitted, fit, fused_ranking
from whaleid.similarity.gallery import Encounters, photos_of
from whaleid.similarity.match_cache import MatchCache

# The least cosine similarity of a mutual match that ranks the photos for a learned matcher's shortlist
# (rerank.glue_shortlist), by extractor. Extractors not listed (ALIKED) keep the embedding's order: the first
# photos of its best ids. ALIKED's descriptors of one point in two photos are less alike than XFeat's (mutual
# nearest neighbours on nyala: median 0.44), so at 0.82 almost no pair matched and the embedding's order was
# what every ALIKED figure measured; ranked by mutual matches over 0.5 instead, validation did not tell the
# two apart (nyala + lions pooled, 1-4 photos of 201) and lions' test photos were named less often
# (docs/measurements.md, 2026-12-08).
SHORTLIST_SIMILARITY = {"xfeat": 0.82}
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


def mutual_test(sim: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours over min_similarity (XFeat's matching) from the cosine similarities
    (query keypoints x one photo's): each keypoint is the other's nearest, so one match per point."""
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        return np.zeros(0, int), np.zeros(0, int)
    nearest, back = sim.argmax(1), sim.argmax(0)
    qi = np.flatnonzero(back[nearest] == np.arange(len(sim)))
    qi = qi[sim[qi, nearest[qi]] > min_similarity]
    return qi, nearest[qi]


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


GLUES = ("lighterglue", "lightglue")  # rerank.matcher values that are learned matchers (photo by photo)
_GLUE: dict = {}
_GLUE_LOCK = threading.Lock()


def glue_matches(q: tuple, g: tuple, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A learned matcher's matches of two photos' (points, descriptors, (width, height)): LighterGlue on
    XFeat's, LightGlue on ALIKED's; the model is loaded once per process (TensorFlow, so only when chosen)."""
    from whaleid.backbones import lightglue
    with _GLUE_LOCK:
        if name not in _GLUE:
            _GLUE[name] = lightglue.lighterglue() if name == "lighterglue" else lightglue.aliked_lightglue()
    if len(q[0]) == 0 or len(g[0]) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    return lightglue.matches(_GLUE[name].match(q[0], q[1], q[2], g[0], g[1], g[2]))


@dataclass(frozen=True)
class Matcher:
    """The settings of one comparison: descriptor kind, how keypoints are paired (rerank.matcher: ratio
    or mutual), RANSAC model and threshold."""
    is_binary: bool
    ratio: float = 0.8
    geometry: str = "homography"
    px: float = 12.0
    pairing: str = "ratio"
    min_similarity: float = 0.82
    glue_confidence: float = 0.1  # a learned matcher's match counts above this probability (rerank.glue_confidence)

    def prepare(self, desc: np.ndarray) -> np.ndarray:
        return desc if self.is_binary else as_float(desc)

    def pairs(self, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query, gallery) keypoint indices paired, from the cosine similarities of unit descriptors."""
        if self.pairing == "mutual":
            return mutual_test(sim, self.min_similarity)
        return ratio_test(sim, self.ratio)

    def match(self, q: tuple, g: tuple, cache: MatchCache | None = None) -> tuple[int, np.ndarray, np.ndarray]:
        """(inliers, query points, gallery points of the inliers) of two photos' (points, prepared desc,
        crop size); a learned matcher's matches are read from `cache` when it has them."""
        if self.pairing in GLUES:
            glue = partial(glue_matches, name=self.pairing)
            qi, gi, p = cache.matches(q, g, glue) if cache is not None else glue(q, g)
            sure = np.asarray(p) > self.glue_confidence  # the cache keeps every match over LightGlue's own 0.1
            qi, gi = np.asarray(qi)[sure], np.asarray(gi)[sure]
        elif self.is_binary:
            qi, gi = ratio_matches(q[1], g[1], True, self.ratio)
        else:
            qi, gi = self.pairs(q[1] @ g[1].T if len(q[1]) and len(g[1]) else np.zeros((len(q[1]), len(g[1]))))
        qxy, gxy = q[0][qi], g[0][gi]
        mask = verify(qxy, gxy, self.geometry, self.px)
        return int(mask.sum()), qxy[mask], gxy[mask]


# ---------------------------------------------------------------- a query against candidate ids

class Reranker:
    """Local scores of a query's candidate ids against their gallery photos (features from a Store)."""

    def __init__(self, store: Store, photos_of: dict[str, list[str]], matcher: Matcher, candidates: int,
                 mirror: bool, encounters: Encounters | None = None, glue_shortlist: int = 0,
                 cache: MatchCache | None = None):
        self.store, self.photos_of, self.matcher = store, photos_of, matcher
        self.glue_shortlist = glue_shortlist if matcher.pairing in GLUES else 0
        self.cache = cache if matcher.pairing in GLUES else None  # the learned matcher's pairs, kept across runs
        # what ranks the photos for the glue matcher's shortlist: the descriptors' mutual matches, no geometry
        # (None: extractors kept in the embedding's order, SHORTLIST_SIMILARITY)
        similarity = SHORTLIST_SIMILARITY.get(store.method)
        self.coarse = None if similarity is None else Matcher(False, matcher.ratio, "none", matcher.px, "mutual",
                                                              similarity)
        self.candidates, self.mirror = candidates, mirror and store.mirrored
        self.encounters = encounters or Encounters()

    def apart(self, query: str, photo: str) -> bool:
        """May `photo` verify `query`? Not itself (a validation photo is never its own gallery photo),
        and not a photo of its own encounter (the same background would match)."""
        return self.encounters.apart(query, photo)

    def features(self, image: str, mirror: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        pts, desc = self.store.get(image, mirror)
        return pts, self.matcher.prepare(desc), self.store.size(image) if image in self.store else (1, 1)

    def best(self, query: str, ident: str | None, photos: list[str] | None = None):
        """(inliers, gallery photo, mirrored query?, query points, photo points) of the id's best photo
        (or of the best of `photos`)."""
        views = [self.features(query)] + ([self.features(query, True)] if self.mirror else [])
        out = (0, None, False, np.zeros((0, 2)), np.zeros((0, 2)))
        for photo in self.photos_of.get(ident, []) if photos is None else photos:
            if not self.apart(query, photo):
                continue  # a validation photo is never its own gallery photo (split keeps them apart)
            g = self.features(photo)
            for mirrored, q in enumerate(views):
                n, qxy, gxy = self.matcher.match(q, g, self.cache)
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
                 for photo in self.photos_of.get(ident, []) if self.apart(query, photo)]
        if self.glue_shortlist and len(pairs) > self.glue_shortlist:
            # the glue matcher on the first photos of the embedding's best ids (WildFusion's shortlist), or
            # on those whose mutual matches rank best (XFeat)
            if self.coarse is None:
                pairs = pairs[: self.glue_shortlist]
            else:
                coarse = self.photo_scores(query, pairs, self.coarse)
                pairs = [pairs[j] for j in sorted(np.argsort(-coarse, kind="stable")[: self.glue_shortlist])]
        if self.matcher.is_binary or self.matcher.pairing in GLUES:  # photo by photo
            for i, photo in pairs:
                out[i] = max(out[i], self.best(query, ident=None, photos=[photo])[0])
            if self.cache is not None:  # the query is done: its pairs are kept (a killed run keeps it)
                for mirrored in (False, True) if self.mirror else (False,):
                    self.cache.flush(self.features(query, mirrored))
            return out
        for (i, _), n in zip(pairs, self.photo_scores(query, pairs, self.matcher)):
            out[i] = max(out[i], n)
        return out

    def photo_scores(self, query: str, pairs: list[tuple[int, str]], matcher: Matcher) -> np.ndarray:
        """The inliers (matches with geometry none) of the query against each (id index, photo) of
        `pairs` by `matcher` (float descriptors, ratio or mutual pairing): one product per block of
        photos, BLAS, not Python."""
        views = [self.features(query)] + ([self.features(query, True)] if self.mirror else [])
        out = np.zeros(len(pairs), np.float32)
        for start in range(0, len(pairs), BLOCK):
            block = pairs[start:start + BLOCK]
            feats = [self.features(photo) for _, photo in block]
            ends = np.cumsum([len(f[1]) for f in feats])
            gallery = np.concatenate([f[1] for f in feats])
            for q in views:
                sim = q[1] @ gallery.T if len(q[1]) else np.zeros((0, len(gallery)), np.float32)
                for j, (f, end) in enumerate(zip(feats, ends)):
                    qi, gi = matcher.pairs(sim[:, end - len(f[1]):end])
                    mask = verify(q[0][qi], f[0][gi], matcher.geometry, matcher.px)
                    out[start + j] = max(out[start + j], mask.sum())
        return out


def reranker(get, store: Store, gallery: pd.DataFrame, encounters: Encounters | dict | None = None,
             work=None) -> Reranker:
    """The one way a Reranker is built (evaluate, predict, identify, the report's drawings): `get(key)`
    reads the rerank settings, `gallery` (Image, Id) holds the candidates' photos; `encounters` (photo
    -> encounter): a query is never matched with a photo of its own encounter; `work`: the work folder
    whose match_cache/ keeps a learned matcher's pairs across runs (None: not kept)."""
    matcher = Matcher(binary(store.method), get("rerank.ratio"), get("rerank.geometry"), get("rerank.ransac_px"),
                      get("rerank.matcher"), get("rerank.min_similarity"), get("rerank.glue_confidence"))
    mirror = bool(get("train.flip_ids") and get("predict.mirror_is_same"))
    rule = encounters if isinstance(encounters, Encounters) else Encounters(encounters)
    return Reranker(store, photos_of(gallery), matcher, get("rerank.candidates"), mirror, rule,
                    get("rerank.glue_shortlist"), MatchCache(work, matcher.pairing))


def local_scores(run, reranker: Reranker, queries: list[str], rankings: list) -> list[np.ndarray]:
    """Inlier counts per query's ranked ids, over --workers threads (matching and RANSAC free the GIL)."""
    jobs = [(q, list(labels)) for q, (labels, _) in zip(queries, rankings)]
    return list(run.map(partial(Reranker.scores, reranker), jobs, "verify local features", chunksize=4))


# ---------------------------------------------------------------- the signal the ranking path adds

class LocalSignal:
    """Re-ranking as one signal of the ranking path (inference/ranking.py): each query's first
    `candidates` ids verified by local features, the inliers fused with the embedding score. With the
    queries' truths (evaluate), the fusion is fitted on them and each query re-ranked by the fusion of
    the other half (cross-fitted), and `fitted` keeps the fusion of all of them for calibration.json;
    without (predict, identify), `fusion` is evaluate's. `prefix`: the queries' names in the store."""

    name = "local"  # rerank.method

    def __init__(self, reranker: Reranker, fusion: Fusion | None = None, prefix: str = "", mode: str = "average"):
        self.reranker, self.fusion, self.prefix, self.mode = reranker, fusion, prefix, mode
        self.candidates = reranker.candidates
        self.fitted: Fusion | None = None
        self.inliers: list[np.ndarray] = []

    def rerank(self, run, queries: list[str], rankings: list, k: int, truths: list[str] | None = None) -> list:
        inliers = local_scores(run, self.reranker, [self.prefix + q for q in queries], rankings)
        self.inliers = inliers
        if truths is None:
            if self.fusion is None:
                raise ValueError("LocalSignal without a fusion needs the queries' truths to fit one")
            run.echo(f"re-ranked by local features (fusion {self.fusion.mode}): median "
                     f"{np.median([c[0] for c in inliers]) if inliers else 0:.0f} inliers for the first candidate")
            return [fused_ranking(r, n, self.fusion, k) for r, n in zip(rankings, inliers)]
        if self.mode == "auto":
            mode, top1s, ranked = choose(rankings, inliers, truths, queries, self.candidates, k)
            run.echo("rerank.fusion = auto: validation top-1 (cross-fitted) " +
                     ", ".join(f"{m} {v:.3f}" for m, v in top1s.items()) + f": {mode}")
        else:
            mode, top1s = self.mode, {}
            ranked = cross_fitted(rankings, inliers, truths, queries, self.candidates, k, mode)
        f = self.fitted = replace(fit(rankings, inliers, truths, self.candidates, mode), setting=self.mode,
                                  validation_top1=top1s)
        run.echo(f"rerank: fusion fitted on {f.pairs} validation (query, id) pairs, {f.same} of the same id: "
                 f"embedding {f.embedding[0]:.2f}x{f.embedding[1]:+.2f}, "
                 f"local {f.local[0]:.2f}x log(1+inliers){f.local[1]:+.2f}")
        return ranked

    def calibration(self) -> dict:
        """What evaluate writes to calibration.json: the fusion fitted on all validation queries."""
        return {"method": self.name, **self.fitted.to_json()}


def summary_line(r: dict) -> str:
    """evaluate's line on what re-ranking buys (metrics.json's "rerank")."""
    a, b = r["without"], r["with"]
    return (f"  re-ranking {r['candidates']} ids by local features: best MAP@5 {a['map5']:.4f} -> {b['map5']:.4f}, "
            f"closed-set top-1 {a['closed_top1']} -> {b['closed_top1']} (cross-fitted on validation halves)")
