"""Turning per-version class scores into Kaggle answers, scoring them, and checking the file.

The original's TTA code read class indices 0,1,2.. instead of the ranked classes and appended the
TTA variant number as if it were a whale id: almost every row became `new_whale` first with repeated
labels (0.276, the trivial baseline). Everything here works on ranked labels and is tested on
constructed tables.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..pipeline.tables import NEW_WHALE

MAP_K = 5  # Kaggle's metric is MAP@5: map5/average_precision score the first 5 labels of an answer
# How many labels an answer holds is the setting predict.top_k: the functions that build or check
# answers take it as `k`, with no default of their own (validate: the shipped default's value).


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


# ---------------------------------------------------------------- the metric

def average_precision(truth: str, predicted: list[str], k: int = MAP_K) -> float:
    """Kaggle's MAP@5 for one image: 1/rank of the first correct label in the top k, else 0.
    A repeated label counts once (only its first occurrence has a rank)."""
    seen = []
    for label in predicted:
        if label in seen:
            continue
        seen.append(label)
        if len(seen) > k:
            break
        if label == truth:
            return 1.0 / len(seen)
    return 0.0


def map5(truths, predictions, k: int = MAP_K) -> float:
    truths = list(truths)
    if not truths:
        return 0.0
    return float(np.mean([average_precision(t, p, k) for t, p in zip(truths, predictions)]))


def scores(truths, predictions) -> dict:
    truths, predictions = list(truths), [list(p) for p in predictions]
    return {"map5": round(map5(truths, predictions), 4),
            "top1": round(float(np.mean([bool(p) and p[0] == t for t, p in zip(truths, predictions)])), 4) if truths else 0.0,
            "all_new_whale_map5": round(map5(truths, [[NEW_WHALE]] * len(truths)), 4),
            "images": len(truths),
            "new_whale_share": round(float(np.mean([t == NEW_WHALE for t in truths])), 4) if truths else 0.0}


# ---------------------------------------------------------------- the file

class SubmissionError(ValueError):
    pass


def validate(df: pd.DataFrame, expected_images: list[str], k: int | None = None, source: str = "submission",
             ordered: bool = True) -> None:
    """Raise SubmissionError naming the first problem; a file that passes scores on Kaggle. Each row
    must hold exactly k distinct labels: pass the run's predict.top_k (None: the shipped default's).
    ordered: the rows must follow `expected_images`' order (sample_submission's); False when
    `expected_images` is a solution file's list, whose order means nothing."""
    if k is None:
        from ..pipeline import config
        k = config.defaults()["predict"]["top_k"]
    if list(df.columns) != ["Image", "Id"]:
        raise SubmissionError(f"{source}: header must be exactly Image,Id (got {','.join(map(str, df.columns))})")
    dup = df.Image[df.Image.duplicated()]
    if len(dup):
        raise SubmissionError(f"{source}: image {dup.iloc[0]} appears more than once")
    have, want = set(df.Image), set(expected_images)
    if want - have:
        missing = sorted(want - have)
        raise SubmissionError(f"{source}: {len(missing)} images of sample_submission are missing, e.g. {missing[0]}")
    if have - want:
        extra = sorted(have - want)
        raise SubmissionError(f"{source}: {len(extra)} images are not in sample_submission, e.g. {extra[0]}")
    if ordered:
        for i, (image, want_here) in enumerate(zip(df.Image, expected_images), start=2):
            if image != want_here:
                raise SubmissionError(f"{source}: row {i} is {image}, expected {want_here}: rows must follow "
                                      f"sample_submission's order")
    for i, (image, ids) in enumerate(zip(df.Image, df.Id), start=2):
        labels = str(ids).split()
        if len(labels) != k:
            raise SubmissionError(f"{source}: row {i} ({image}): {len(labels)} labels, expected exactly {k}")
        if len(set(labels)) != k:
            raise SubmissionError(f"{source}: row {i} ({image}): repeated label in '{ids}'")


def read_submission(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV ({e})") from None


def score_files(submission: Path, solution: Path, k: int | None = None) -> dict:
    """MAP@5, top-1 and the all-new_whale baseline of any submission against a solution (Image,Id);
    k: labels per row (predict.top_k; None: the shipped default's)."""
    sub, sol = read_submission(submission), read_submission(solution)
    for name, df in (("solution", sol), ("submission", sub)):
        if not {"Image", "Id"} <= set(df.columns):
            raise SubmissionError(f"{name} file needs columns Image,Id")
    validate(sub, list(sol.Image), k, source=str(submission), ordered=False)
    preds = dict(zip(sub.Image, sub.Id.str.split()))
    return scores(sol.Id, [preds[i] for i in sol.Image])
