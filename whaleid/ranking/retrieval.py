"""Ranking known ids by similarity to a query photo (prediction by retrieval), in NumPy.

Every head gives a photo a vector and a similarity in [0, 1] between two vectors (heads/), so one
new_whale threshold and one sweep serve all heads. An id's score for a query is its best photo's
similarity (max over the id's gallery photos).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


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
