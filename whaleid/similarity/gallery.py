"""The gallery: the photos of known ids a query is compared with, and the one rule that turns photo
similarities into id scores, in NumPy.

Every head gives a photo a vector and a similarity in [0, 1] between two vectors (learning/heads/),
so one new_whale threshold and one sweep serve all heads. An id's score for a query is its best
photo's similarity (max over the id's gallery photos): IdIndex is the only place that groups
gallery photos by id, for evaluate, predict and identify (inference/ranking.py) and for training's
validation metric (learning/callbacks.py) alike.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from whaleid.data.tables import NEW_WHALE
from whaleid.preprocess import augment


class IdIndex:
    """Gallery columns grouped by id: classes[i] is the id of output column i (sorted)."""

    def __init__(self, gallery_ids):
        ids = np.asarray(gallery_ids).astype(str)
        if len(ids) == 0:
            raise ValueError("the gallery is empty: no photos of known ids to compare with")
        self.classes, self.codes = np.unique(ids, return_inverse=True)
        self.order = np.argsort(self.codes, kind="stable")
        self.starts = np.flatnonzero(np.r_[True, np.diff(self.codes[self.order]) != 0])

    def best(self, S: np.ndarray) -> np.ndarray:
        """(nq, ng) photo similarities -> (nq, len(classes)): each id's best photo."""
        S = np.asarray(S)
        return np.maximum.reduceat(S[:, self.order], self.starts, axis=1)

    def top(self, S: np.ndarray, k: int) -> np.ndarray:
        """(nq, k) class indices, best id first (ties: the lower index, as a stable sort)."""
        return np.argsort(-self.best(S), axis=1, kind="stable")[:, :min(k, len(self.classes))]

    def best_photo(self, S: np.ndarray) -> np.ndarray:
        """(nq, ng) photo similarities -> (nq, len(classes)): the gallery row of each id's best photo
        (the first such row on a tie)."""
        S = np.asarray(S)[:, self.order]
        ends = np.r_[self.starts[1:], S.shape[1]]
        out = np.empty((S.shape[0], len(self.starts)), np.int64)
        for c, (a, b) in enumerate(zip(self.starts, ends)):
            out[:, c] = self.order[a + np.argmax(S[:, a:b], axis=1)]
        return out


class Encounters:
    """Which photos may not be compared: those taken together (photo -> encounter; a photo it does not
    name is its own) and, with `sides` (photo -> left | right), those of opposite flanks. The one rule
    every such test follows (the gallery's scores, local matching, identify's photos shown); photos
    are coded as integers so that queries x gallery is one vectorised comparison."""

    SIDE_CODES = {"left": 1, "right": 2}  # 0: unknown, compared with every side

    def __init__(self, of: dict[str, str] | None = None, sides: dict[str, str] | None = None):
        self.of = dict(of or {})
        self.sides = {p: s for p, s in (sides or {}).items() if s in self.SIDE_CODES}
        self._codes: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.of or self.sides)

    def codes(self, photos) -> np.ndarray:
        """(n, 2): each photo's encounter as an integer (-1 for None: a padding row, of no encounter) and
        its side code (0 unknown)."""
        enc = [-1 if p is None else self._codes.setdefault(self.of.get(p, p), len(self._codes)) for p in photos]
        side = [0 if p is None else self.SIDE_CODES.get(self.sides.get(p, ""), 0) for p in photos]
        return np.stack([np.array(enc, np.int64), np.array(side, np.int64)], 1).reshape(-1, 2)

    def same(self, queries, gallery_codes: np.ndarray) -> np.ndarray:
        """(queries, gallery rows) bool: the gallery photo (coded by `codes`) may not score the query: it
        is of the query's encounter, or of the other side."""
        q, g = self.codes(queries), np.asarray(gallery_codes).reshape(-1, 2)
        together = (q[:, :1] == g[None, :, 0]) & (q[:, :1] >= 0)
        other_side = (q[:, 1:] > 0) & (g[None, :, 1] > 0) & (q[:, 1:] != g[None, :, 1])
        return together | other_side

    def apart(self, a: str, b: str) -> bool:
        """May photo b verify photo a? Different encounters (a photo is never apart from itself), and not
        of opposite known sides."""
        sa, sb = self.sides.get(a), self.sides.get(b)
        return a != b and self.of.get(a, a) != self.of.get(b, b) and not (sa and sb and sa != sb)


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

    owners: list | None = None       # the photo of each row of the next batch (set by the ranking path)
    encounters: Encounters | None = None

    def exclude_encounters(self, gallery_photos, encounters: Encounters) -> None:
        """From now on a query photo's score for an id leaves out the gallery photos of the query's own
        encounter (photos taken with it share its background: a match between them proves nothing).
        `gallery_photos`: the photo of each gallery row."""
        self.encounters, self.gallery_codes = encounters, encounters.codes(gallery_photos)

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        S = self.compare(vectors, self.gallery)
        if self.encounters is not None and self.owners is not None:
            rows = list(self.owners[:len(S)]) + [None] * max(0, len(S) - len(self.owners))
            S = np.where(self.encounters.same(rows, self.gallery_codes), -1.0, S)  # under any similarity
        return self.index.best(S)

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        return self.scores(self.encode(images))


def gallery_files(files: pd.DataFrame, photos, all_variants: bool, flips: bool = False) -> pd.DataFrame:
    """File, Image, Id of the gallery: augment's files (TRAINING_FILE_FINAL) of `photos` (None: every
    photo of a known id); the original only (each photo's first file) unless all_variants. With
    flips (train.flip_ids), mirrored files are photos of <id>_flip, and the gallery holds the first
    mirrored file of each photo too."""
    g = files[files.Id != NEW_WHALE]
    if photos is not None:
        g = g[g.Image.isin(set(photos))]
    if flips:
        g = augment.flip_ids(g, dict(zip(g.File, g.variant)))
    if not all_variants:
        g = g.drop_duplicates(["Image", "Id"])
    return g[["File", "Image", "Id"]].reset_index(drop=True)


def photos_of(table: pd.DataFrame) -> dict[str, list[str]]:
    """{id: its photos} of a gallery table (Image, Id), each photo once; the <id>_flip rows of
    train.flip_ids are mirror images of the same photos, left out (local matching mirrors itself)."""
    plain = table[~table.Id.astype(str).str.endswith(augment.FLIP)].drop_duplicates("Image")
    out: dict[str, list[str]] = {}
    for image, ident in zip(plain.Image, plain.Id):
        out.setdefault(str(ident), []).append(str(image))
    return out
