"""From a photo's per-version scores to its answer: the TTA versions merged into ranked ids, new_whale
inserted at the threshold, a labelled duplicate's id first.

The original's TTA code read class indices 0,1,2.. instead of the ranked classes and appended the
TTA variant number as if it were a whale id: almost every row became `new_whale` first with repeated
labels (0.276, the trivial baseline). Everything here works on ranked labels and is tested on
constructed tables.
"""
from __future__ import annotations

import numpy as np

from whaleid.data.tables import NEW_WHALE

# How many labels an answer holds is the setting predict.top_k: the functions that build answers take
# it as `k`, with no default of their own.


# ---------------------------------------------------------------- merging TTA versions

def merge_vote(probs: np.ndarray, classes: list[str], k: int, depth: int = 10) -> list[str]:
    """The original's rule, bugs removed. probs: (versions, classes). Fill k slots in order; for each
    slot take the next-best not-yet-output candidate of every version; an id named by more than one
    version wins (most votes, then highest probability), otherwise the most probable candidate."""
    depth = min(max(depth, k), probs.shape[1])
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :depth]
    ptr = [0] * probs.shape[0]
    out: list[int] = []
    while len(out) < min(k, probs.shape[1]):
        cands = {}
        for v in range(probs.shape[0]):
            while ptr[v] < depth and ranked[v, ptr[v]] in out:
                ptr[v] += 1
            if ptr[v] < depth:
                c = int(ranked[v, ptr[v]])
                votes, best = cands.get(c, (0, 0.0))
                cands[c] = (votes + 1, max(best, float(probs[v, c])))
        if not cands:  # every version exhausted its depth: fall back to the mean ranking
            rest = [int(c) for c in np.argsort(-probs.mean(0), kind="stable") if int(c) not in out]
            out += rest[: k - len(out)]
            break
        out.append(max(cands, key=lambda c: (cands[c][0], cands[c][1], -c)))
    return [classes[c] for c in out]


def merge_mean(probs: np.ndarray, classes: list[str], k: int) -> list[str]:
    """Average the versions' probabilities and rank."""
    order = np.argsort(-probs.mean(0), kind="stable")[:k]
    return [classes[c] for c in order]


def insert_new_whale(labels: list[str], scores: list[float], threshold: float, k: int) -> list[str]:
    """new_whale goes before the first id whose score is under `threshold`; when every score clears
    it, new_whale takes the last slot (at ~27% of test images it beats a 5th-ranked id)."""
    labels = [lab for lab in labels if lab != NEW_WHALE]
    pos = next((i for i, s in enumerate(scores[: len(labels)]) if s < threshold), min(len(labels), k - 1))
    return (labels[:pos] + [NEW_WHALE] + labels[pos:])[:k]


def known_first(labels: list[str], known: str | None, k: int) -> list[str]:
    """A test photo that duplicates a labelled train photo: its id goes first."""
    if not known:
        return labels[:k]
    return ([known] + [lab for lab in labels if lab != known])[:k]


def ranked(probs: np.ndarray, classes: list[str], merge: str, k: int) -> tuple[list[str], list[float]]:
    """The k best ids of one image by its TTA versions' scores (versions, classes), merged by
    predict.merge, each with its mean score over the versions (what the threshold is compared with)."""
    probs = np.atleast_2d(probs)
    top = merge_vote(probs, classes, k) if merge == "vote" else merge_mean(probs, classes, k)
    index = {c: i for i, c in enumerate(classes)}
    mean = probs.mean(0)
    return top, [float(mean[index[c]]) for c in top]


def answer(probs: np.ndarray, classes: list[str], threshold: float, merge: str, known: str | None,
           k: int) -> list[str]:
    """k (predict.top_k) distinct labels for one image from its TTA versions' probabilities
    (versions, classes); merge: predict.merge; known: the id of a labelled duplicate, or None."""
    labels, scores = ranked(probs, classes, merge, k)
    return known_first(insert_new_whale(labels, scores, threshold, k), known, k)


def share_threshold(best_scores, share: float) -> float:
    """The threshold that puts new_whale first for a share `share` of the photos: those whose best
    id scores lowest (new_whale goes first when the best score is under the threshold). Halfway
    between the last photo that gets it and the next, so rounding cannot move a photo across."""
    s = np.sort(np.asarray(best_scores, np.float64))
    j = int(round(share * len(s)))
    if j <= 0 or not len(s):
        return 0.0
    if j >= len(s):
        return 1.01
    return float((s[j - 1] + s[j]) / 2)
