"""Verification and one-shot metrics (seeds 002/003), for every head: is this the same individual?

    roc_auc(labels, scores)                     area under the ROC curve (ties count one half)
    average_ranks(values)                       1-based ranks, ties sharing their mean rank
    precision_recall_f1(labels, scores, thr)    "same" when score >= thr, the rule that places new_whale
    id_pairs(scores, truths, classes, rng)      (query, id) pairs from open-set id scores, as the seeds'
                                                balanced pairs: each known query with its true id (same),
                                                every query (new whales too) with a random id that is
                                                not its own (different)
    one_shot_tasks(ids, queries, n_way, rng)    N-way one-shot tasks: a query photo and N candidate
                                                photos of N distinct ids, one of them the query's own
    one_shot_accuracy(similarities, correct)    share of tasks whose most similar candidate is the right one
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



def average_ranks(values) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the mean of their ranks (scipy.stats.rankdata's
    default "average" method): [10, 20, 10, 30] -> [1.5, 3, 1.5, 4]. Any NaN: all NaN (as rankdata)."""
    x = np.asarray(values, np.float64).ravel()
    if np.isnan(x).any():
        return np.full(x.shape, np.nan)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]          # where each run of equal values starts
    starts = np.flatnonzero(first)                  # 0-based start of each run
    ends = np.r_[starts[1:], len(x)]                # exclusive end: the run holds ranks starts+1..ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(first) - 1]
    return ranks


def roc_auc(labels, scores) -> float:
    """Mann-Whitney form: P(score of a random positive > score of a random negative); nan without both."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall_f1(labels, scores, threshold: float) -> dict:
    labels = np.asarray(labels, bool)
    predicted = np.asarray(scores, np.float64) >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn}


def id_pairs(scores: np.ndarray, truths, classes, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of (query, id) pairs; `scores` (queries, classes), e.g. the TTA mean."""
    scores = np.asarray(scores)
    index = {c: i for i, c in enumerate(classes)}
    labels, values = [], []
    for q, truth in enumerate(truths):
        t = index.get(truth)
        if t is not None:
            labels.append(True)
            values.append(scores[q, t])
        n_other = len(classes) - (t is not None)
        if n_other > 0:
            other = int(rng.integers(n_other))
            labels.append(False)
            values.append(scores[q, other + (t is not None and other >= t)])
    return np.array(labels, bool), np.array(values, np.float64)


@dataclass(frozen=True)
class Tasks:
    query: np.ndarray       # (T,) photo index
    candidates: np.ndarray  # (T, N) photo indices, N distinct ids
    correct: np.ndarray     # (T,) position of the query's own id among the candidates


def one_shot_tasks(ids, queries, n_way: int, rng: np.random.Generator) -> Tasks:
    """One task per query photo whose id has another photo (the correct candidate) and when at least
    n_way - 1 other ids exist; distractor ids drawn without replacement, one photo each."""
    if n_way < 2:
        raise ValueError(f"one-shot tasks need N >= 2 candidates, got {n_way}")
    ids = np.asarray(ids).astype(str)
    uniq, codes = np.unique(ids, return_inverse=True)
    members = [np.flatnonzero(codes == c) for c in range(len(uniq))]
    q_out, c_out, pos_out = [], [], []
    if len(uniq) < n_way:
        return Tasks(np.zeros(0, int), np.zeros((0, n_way), int), np.zeros(0, int))
    for q in np.sort(np.asarray(queries, int)):
        own = members[codes[q]]
        own = own[own != q]
        if len(own) == 0:
            continue
        others = rng.choice(len(uniq) - 1, size=n_way - 1, replace=False)
        others = others + (others >= codes[q])
        cands = [int(rng.choice(members[c])) for c in others]
        pos = int(rng.integers(n_way))
        cands.insert(pos, int(rng.choice(own)))
        q_out.append(int(q))
        c_out.append(cands)
        pos_out.append(pos)
    return Tasks(np.array(q_out, int), np.array(c_out, int).reshape(-1, n_way), np.array(pos_out, int))


def one_shot_accuracy(similarities: np.ndarray, correct) -> float:
    """similarities (T, N); a tie with the correct candidate counts as a miss unless it comes first."""
    similarities = np.asarray(similarities)
    if len(similarities) == 0:
        return float("nan")
    return float(np.mean(np.argmax(similarities, axis=1) == np.asarray(correct)))
