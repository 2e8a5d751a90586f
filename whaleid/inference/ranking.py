"""The one ranking path of evaluate, predict and identify: photos -> the embedding's TTA scores per
known id (inference/embedding.py) -> train-only ids masked -> ranked -> each signal's re-ranking
(similarity/local.py: local features fused with the embedding) -> k best ids per photo. A new signal
(a learned matcher, an encounter rule) is added here once, in `signals`, and all three commands get it.

What each command keeps for itself: predict the Kaggle file and its resumable chunks, evaluate the
metrics and the threshold sweep, identify the review page and matches.csv. The new_whale threshold
of predict and identify is similarity/threshold.py's choose_threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from whaleid.inference import embedding
from whaleid.pipeline.stage import Run
from whaleid.preprocess import augment
from whaleid.preprocess.keypoints import Store, store_path
from whaleid.similarity import answers, local
from whaleid.similarity.fusion import read_calibration
from whaleid.similarity.gallery import Encounters, IdIndex


@dataclass
class Ranked:
    """One photo through the ranking path."""
    image: str
    ranking: tuple[list[str], list[float]] | None = None  # ids best first and their scores (k of them)
    top: float = 0.0                      # the best score, what the new_whale threshold is compared with
    error: str | None = None              # why the photo could not be scored (then nothing else is set)
    plain: tuple[list[str], list[float]] | None = None    # the embedding's own ranking (k), before signals
    scores: np.ndarray | None = None      # (TTA versions, ids) scores, kept for evaluate's verification


class Ranker:
    """Ranks photos against one gallery. `gallery`: File, Image, Id of augment's files (or identify's
    catalogue, with its `vectors` already embedded); `never`: ids that are never an answer (train-only:
    they score -1, under any answer); `signals`: re-rankers of the first `candidates` ids (`signals`
    below builds them from the settings); `fixed_rows`: every forward pass at one batch size (predict's
    chunks, so that a resumed run writes the same files); `encounters` (photo_rule's): a query is never
    scored by a gallery photo of its own encounter, nor of its other side."""

    def __init__(self, run: Run, net, gallery: pd.DataFrame, k: int, vectors: np.ndarray | None = None,
                 never=frozenset(), signals=(), fixed_rows: bool = False, encounters: Encounters | None = None):
        self.run, self.k, self.signals = run, k, list(signals)
        self.model, self.classes = embedding.scorer(run, net, gallery, vectors)
        self.on_batch = self.same_encounter_rule(gallery, encounters) if encounters else None
        self.drop = np.array([c in never for c in self.classes]) if never else None
        self.depth = max([k] + [s.candidates for s in self.signals])
        self.merge, self.batch = run.setting("predict.merge"), run.setting("predict.batch_size")
        if fixed_rows:
            versions = len(augment.TTA) if run.setting("predict.tta") else 1
            self.model = embedding.FixedBatch(self.model, self.batch * versions)

    def rank(self, jobs: list[tuple], desc: str = "TTA + model", truths: dict[str, str] | None = None,
             keep_scores: bool = False) -> list[Ranked]:
        """jobs: (image, path, box or None) as embedding.prepare takes them; truths: each image's id,
        for a signal that fits on labelled queries (evaluate). Returns one Ranked per job, in order."""
        out = []
        for image, scores, error in embedding.class_scores(self.run, self.model, jobs, self.batch, desc, self.on_batch):
            if error:
                out.append(Ranked(image, error=error))
                continue
            if self.drop is not None:
                scores = np.where(self.drop, -1.0, scores)
            plain = answers.ranked(scores, self.classes, self.merge, self.k)
            deep = answers.ranked(scores, self.classes, self.merge, self.depth) if self.depth > self.k else plain
            out.append(Ranked(image, deep, float(scores.mean(0).max()), None, plain, scores if keep_scores else None))
        self.apply_signals([r for r in out if r.error is None], truths)
        return out

    def same_encounter_rule(self, gallery: pd.DataFrame, encounters: Encounters):
        """The on_batch hook that has the gallery leave out each query's own encounter (and other side)."""
        scorer = embedding.gallery_scorer(self.model)
        if scorer is None:
            self.run.echo("the softmax head scores its classes, not gallery photos: a query's own encounter cannot be "
                          "left out of its scores (a retrieval head, arcface, triplet or siamese, can)")
            return None
        scorer.exclude_encounters(gallery.Image, encounters)
        return lambda owners: setattr(scorer, "owners", owners)

    def apply_signals(self, ranked: list[Ranked], truths: dict[str, str] | None) -> None:
        if not self.signals or not ranked:
            return
        names = [r.image for r in ranked]
        rankings = [r.ranking for r in ranked]
        labels = [truths[n] for n in names] if truths is not None else None
        for signal in self.signals:
            rankings = signal.rerank(self.run, names, rankings, self.k, labels)
        for r, ranking in zip(ranked, rankings):
            r.ranking, r.top = ranking, (ranking[1][0] if ranking[1] else 0.0)


def signals(run: Run, gallery: pd.DataFrame, stores: tuple[str, ...] = ("keypoints",), extra_store=None,
            fitted: bool = False, prefix: str = "", encounters: Encounters | None = None) -> list:
    """The re-ranking signals the settings ask for, the one place that says which (rerank.method =
    local: LocalSignal). A signal has `name`, `candidates` (how many ids it re-ranks),
    `rerank(run, queries, rankings, k, truths)` and `calibration()` (what evaluate records). `gallery`
    (Image, Id): the candidates' photos; `stores`: the keypoint stages whose features are read, and
    `extra_store()`, a batch's own features (called only when needed); `fitted`: the fusion is fitted
    on the queries' truths (evaluate), else evaluate's calibration is read; `prefix`: the queries'
    names in the store; `encounters`: no query is matched with a photo of its own encounter."""
    if run.setting("rerank.method") == "none":
        return []
    store = Store(*(store_path(run.session, s) for s in stores), *([extra_store()] if extra_store else []))
    reranker = local.reranker(run.setting, store, gallery, encounters, run.work)
    mode = run.setting("rerank.fusion")
    return [local.LocalSignal(reranker, None if fitted else read_calibration(run.work, mode), prefix, mode)]


def photo_rule(run: Run, encounters: dict | None, sides: dict | None) -> Encounters | None:
    """Which gallery photos may not score a query: its own encounter's (photo -> encounter) and, with
    predict.sides = same, those of its other flank (photo -> left | right); None when nothing is known."""
    rule = Encounters(encounters, sides if run.setting("predict.sides") == "same" else None)
    return rule if rule else None


def best_photos(similarity, Q: np.ndarray, G: np.ndarray, gallery_ids, candidates: list[list[str]],
                set_aside: np.ndarray | None = None) -> list[list[int]]:
    """For each query and each of its candidate ids: the gallery row of that id's photo most similar
    to the query (-1 for an id without one), by `similarity(Q, G)` (the head's); `set_aside` (queries x
    gallery rows, bool): photos never shown for that query (its own encounter's)."""
    index = IdIndex(gallery_ids)
    column = {c: i for i, c in enumerate(index.classes)}
    out = []
    for s in range(0, len(Q), 256):
        S = similarity(Q[s:s + 256], G)
        if set_aside is not None and set_aside.any():
            S = np.where(set_aside[s:s + 256], -np.inf, S)
        rows = index.best_photo(S)
        for i, ids in enumerate(candidates[s:s + 256]):
            out.append([int(rows[i, column[c]]) if c in column else -1 for c in ids])
    return out
