"""Ranking known ids by similarity to a query photo (the embedding heads' prediction), in NumPy.

Every head gives a photo a vector and a similarity in [0, 1] between two vectors, so one new_whale
threshold and one sweep serve all heads:
    softmax   the class probabilities; p_a . p_b, the probability that both show the same class
    siamese   the embedding; sigmoid(w . f(a, b) + b) with f = |a-b| (l1) or the concatenation of
              a+b, a*b, |a-b|, (a-b)^2 (rich): the trained pair head, evaluated here without Keras
    triplet   the unit embedding; (1 + a.b) / 2 = 1 - |a-b|^2 / 4
An id's score for a query is its best photo's similarity (max over the id's gallery photos). Query x
gallery similarities are matrix products; only |a-b| has no product form and is computed in chunks
of queries, so memory stays bounded for a 25k-photo gallery.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FEATURES = {"l1": ("absdiff",), "rich": ("sum", "product", "absdiff", "sqdiff")}
MAX_ELEMENTS = 1 << 24  # floats in one chunk of |q - g| (64 MB)


@dataclass(frozen=True)
class PairWeights:
    """The siamese pair head: logit = bias + kernel . concat(features of the pair)."""
    kernel: np.ndarray      # (len(FEATURES[features]) * d,)
    bias: float
    features: str = "l1"

    def per_feature(self) -> list[tuple[str, np.ndarray]]:
        names = FEATURES[self.features]
        return list(zip(names, np.asarray(self.kernel, np.float32).reshape(len(names), -1)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float32)))).astype(np.float32)


def pair_logits(Q: np.ndarray, G: np.ndarray, pair: PairWeights, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """(nq, ng) logits of the pair head for every (query, gallery) pair."""
    Q, G = np.asarray(Q, np.float32), np.asarray(G, np.float32)
    out = np.full((len(Q), len(G)), pair.bias, np.float32)
    for name, w in pair.per_feature():
        if name == "sum":
            out += (Q @ w)[:, None] + (G @ w)[None, :]
        elif name == "product":
            out += (Q * w) @ G.T
        elif name == "sqdiff":
            out += ((Q * Q) @ w)[:, None] + ((G * G) @ w)[None, :] - 2.0 * ((Q * w) @ G.T)
        elif name == "absdiff":
            step = max(1, max_elements // max(1, G.size))
            for s in range(0, len(Q), step):
                out[s:s + step] += np.abs(Q[s:s + step, None, :] - G[None, :, :]) @ w
        else:
            raise ValueError(f"unknown pair feature {name!r}")
    return out


def _row_features(A: np.ndarray, B: np.ndarray, features: str) -> np.ndarray:
    parts = {"sum": lambda: A + B, "product": lambda: A * B, "absdiff": lambda: np.abs(A - B),
             "sqdiff": lambda: (A - B) ** 2}
    return np.concatenate([parts[n]() for n in FEATURES[features]], axis=1)


def similarity(head: str, Q: np.ndarray, G: np.ndarray, pair: PairWeights | None = None) -> np.ndarray:
    """(nq, ng) similarities in [0, 1] (see the module docstring)."""
    Q, G = np.asarray(Q, np.float32), np.asarray(G, np.float32)
    if head == "softmax":
        return Q @ G.T
    if head == "triplet":
        return np.clip(0.5 * (1.0 + Q @ G.T), 0.0, 1.0)
    if head == "siamese":
        return sigmoid(pair_logits(Q, G, pair))
    raise ValueError(f"unknown head {head!r}")


def pair_similarity(head: str, A: np.ndarray, B: np.ndarray, pair: PairWeights | None = None) -> np.ndarray:
    """(n,) similarities of aligned rows A[i], B[i]."""
    A, B = np.asarray(A, np.float32), np.asarray(B, np.float32)
    if head == "softmax":
        return np.einsum("ij,ij->i", A, B)
    if head == "triplet":
        return np.clip(0.5 * (1.0 + np.einsum("ij,ij->i", A, B)), 0.0, 1.0)
    if head == "siamese":
        return sigmoid(_row_features(A, B, pair.features) @ np.asarray(pair.kernel, np.float32) + pair.bias)
    raise ValueError(f"unknown head {head!r}")


class IdIndex:
    """Gallery columns grouped by id, for `best`: classes[i] is the id of output column i (sorted)."""

    def __init__(self, gallery_ids):
        ids = np.asarray(gallery_ids).astype(str)
        if len(ids) == 0:
            raise ValueError("the gallery is empty: no photos of known ids to compare with")
        self.classes, codes = np.unique(ids, return_inverse=True)
        self.order = np.argsort(codes, kind="stable")
        self.starts = np.flatnonzero(np.r_[True, np.diff(codes[self.order]) != 0])

    def best(self, S: np.ndarray) -> np.ndarray:
        """(nq, ng) photo similarities -> (nq, len(classes)): each id's best photo."""
        S = np.asarray(S)
        return np.maximum.reduceat(S[:, self.order], self.starts, axis=1)


class GalleryScorer:
    """Stands in for a softmax model in predict/evaluate: predict_on_batch(images) gives, per image,
    a score per known id (its best gallery photo's similarity) instead of class probabilities, so TTA,
    the merge, the new_whale threshold and the sweep work unchanged."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], compare: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 gallery_vectors: np.ndarray, gallery_ids):
        self.encode, self.compare = encode, compare
        self.gallery = np.asarray(gallery_vectors, np.float32)
        self.index = IdIndex(gallery_ids)
        if len(self.gallery) != len(self.index.order):
            raise ValueError("gallery vectors and ids differ in length")
        self.classes = [str(c) for c in self.index.classes]

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        return self.index.best(self.compare(vectors, self.gallery))

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        return self.scores(self.encode(images))
