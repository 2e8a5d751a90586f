"""Fusing the embedding's score with the local-feature score (similarity/local.py), as WildFusion
(Cermak et al. 2024): each score is mapped to a match probability by a logistic fit on validation
(query, candidate id) pairs, same id or not, and the two probabilities are averaged (rerank.fusion =
average). rerank.fusion = local ranks the candidates by their local evidence (inliers) alone, the
embedding only shortlisting them and breaking ties, and scores each by P(same | inliers): for a matcher
that is stronger than the embedding (learned matchers on the animal's mask, docs/measurements.md),
which a validation set too small to fit the average's weights cannot show. rerank.fusion = auto picks
one of the two by validation top-1 (each cross-fitted): local where the matcher sees the individual's
marks (nyala's flank stripes), average where photos show different body parts (lions). evaluate fits the
calibrations (never on test photos) and writes WORK/evaluate/calibration.json; predict and identify
read it. The new_whale threshold then works on the fused score.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from whaleid.data.tables import NEW_WHALE
from whaleid.pipeline.stage import StageError

CALIBRATION = "calibration.json"  # WORK/evaluate/calibration.json: the fusion, fitted on validation


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def fit_logistic(x, y, l2: float = 1e-2, iters: int = 50) -> tuple[float, float]:
    """(a, b) of P(same | x) = sigmoid(a x + b), by Newton's method with a small ridge on a (so that
    separable data still gives finite weights), each step halved until the loss falls (plain Newton
    oscillates without end when few pairs have evidence: confident learned matches, rerank.glue_confidence);
    one class only: a = 0 and b its clipped log odds."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    prior = float(np.clip(y.mean() if len(y) else 0.5, 1e-3, 1 - 1e-3))
    if len(y) == 0 or y.min() == y.max():
        return 0.0, float(np.log(prior / (1 - prior)))
    X = np.stack([x, np.ones_like(x)], axis=1)
    w = np.array([0.0, np.log(prior / (1 - prior))])
    ridge = np.diag([l2, 1e-9])

    def loss(w):
        z = X @ w
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * w @ ridge @ w)

    current = loss(w)
    for _ in range(iters):
        p = sigmoid(X @ w)
        grad = X.T @ (p - y) + ridge @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge
        step = np.linalg.solve(hess, grad)
        for _ in range(40):  # backtracking: a full Newton step may overshoot
            if loss(w - step) <= current:
                break
            step = step / 2
        else:
            break
        w -= step
        current = loss(w)
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def local_feature(inliers):
    return np.log1p(np.asarray(inliers, np.float64))


@dataclass(frozen=True)
class Fusion:
    """Two calibrations (a, b) and how they combine (`mode`, rerank.fusion): what a (query, id) pair's
    fused score is."""
    embedding: tuple[float, float]
    local: tuple[float, float]
    pairs: int = 0
    same: int = 0
    mode: str = "average"
    setting: str = ""  # rerank.fusion as evaluate ran it ("auto" chose `mode`); "" in older files: `mode`
    validation_top1: dict = field(default_factory=dict)  # auto: each mode's cross-fitted top-1 on validation

    def p_embedding(self, scores):
        return sigmoid(self.embedding[0] * np.asarray(scores, np.float64) + self.embedding[1])

    def p_local(self, inliers):
        # more inliers never lowers the probability (a slope fitted <= 0 says the evidence is flat)
        return sigmoid(max(self.local[0], 0.0) * local_feature(inliers) + self.local[1])

    def fused(self, scores, inliers) -> np.ndarray:
        if self.mode == "local":
            return self.p_local(inliers)
        return 0.5 * (self.p_embedding(scores) + self.p_local(inliers))

    def order(self, scores, inliers) -> np.ndarray:
        """Candidates best first: by fused score, or (local) by inliers, the embedding breaking ties."""
        if self.mode == "local":
            return np.lexsort((-np.asarray(scores, np.float64), -np.asarray(inliers, np.float64)))
        return np.argsort(-self.fused(scores, inliers), kind="stable")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Fusion":
        return cls(tuple(data["embedding"]), tuple(data["local"]), int(data.get("pairs", 0)), int(data.get("same", 0)),
                   data.get("mode", "average"), data.get("setting", ""), dict(data.get("validation_top1", {})))

    @property
    def asked(self) -> str:
        return fitted_for(asdict(self))

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


def fit(rankings: list, inliers: list, truths: list[str], candidates: int, mode: str = "average") -> Fusion:
    """The fusion fitted on labelled (validation) queries: new whales too, as negatives only."""
    e, n, y = pairs(rankings, inliers, truths, candidates)
    return Fusion(fit_logistic(e, y), fit_logistic(local_feature(n), y), int(len(y)), int(y.sum()), mode)


def fused_ranking(ranking: tuple, inliers: np.ndarray, fusion: Fusion, k: int) -> tuple[list[str], list[float]]:
    """The ids re-ranked by fused score (ids past the verified ones count 0 inliers), k best."""
    labels, scores = ranking
    counts = np.zeros(len(labels))
    counts[: len(inliers)] = inliers[: len(labels)]
    fused = fusion.fused(scores, counts)
    order = fusion.order(scores, counts)[:k]
    return [labels[i] for i in order], [float(fused[i]) for i in order]


def cross_fitted(rankings: list, inliers: list, truths: list[str], names: list[str], candidates: int,
                 k: int, mode: str = "average") -> list[tuple[list[str], list[float]]]:
    """Re-ranked validation queries, each scored by a fusion fitted on the other half of the queries
    (2-fold, halves by photo name), so evaluate's figures are not measured on the pairs they were fit on."""
    fold = np.array([zlib.crc32(n.encode()) % 2 for n in names], int)
    out: list = [None] * len(rankings)
    for f in (0, 1):
        train = np.flatnonzero(fold != f)
        fusion = fit([rankings[i] for i in train], [inliers[i] for i in train], [truths[i] for i in train], candidates,
                     mode)
        for i in np.flatnonzero(fold == f):
            out[i] = fused_ranking(rankings[i], inliers[i], fusion, k)
    return out


MODES = ("average", "local")  # what rerank.fusion = auto chooses from (ties: average, the embedding kept)


def fitted_for(calibration: dict) -> str:
    """The rerank.fusion setting a calibration (calibration.json's, metrics.json's) answers: auto's, not
    its choice ("setting" is absent in files older than auto)."""
    return calibration.get("setting") or calibration.get("mode", "average")


def top1(rankings: list, truths: list[str]) -> float | None:
    """Closed-set top-1: the share of queries of known ids (not new_whale) whose first id is right; None
    without such queries."""
    hits = [bool(labels) and labels[0] == t for (labels, _), t in zip(rankings, truths) if t != NEW_WHALE]
    return float(np.mean(hits)) if hits else None


def choose(rankings: list, inliers: list, truths: list[str], names: list[str], candidates: int,
           k: int) -> tuple[str, dict, list]:
    """rerank.fusion = auto: (the mode of the best cross-fitted validation top-1, each mode's top-1,
    that mode's re-ranked queries)."""
    ranked = {m: cross_fitted(rankings, inliers, truths, names, candidates, k, m) for m in MODES}
    scores = {m: round(top1(ranked[m], truths) or 0.0, 4) for m in MODES}
    best = max(MODES, key=lambda m: (scores[m], m == "average"))
    return best, scores, ranked[best]


def read_calibration(work: Path, mode: str = "average") -> Fusion:
    """The fusion evaluate fitted (for rerank.fusion = `mode`), or a clear error naming the command that fits it."""
    path = Path(work) / "evaluate" / CALIBRATION
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("method") != "local":
        raise StageError(f"rerank.method = local fuses scores by the calibration evaluate fits on validation, and "
                         f"{path} has none: run whaleid evaluate --work {work} --set rerank.method=local first")
    fusion = Fusion.from_json(data)
    if fusion.asked != mode:
        raise StageError(f"{path} was fitted with rerank.fusion = {fusion.asked}, and this run asks for {mode}: "
                         f"run whaleid evaluate --work {work} --set rerank.fusion={mode} first")
    return fusion
