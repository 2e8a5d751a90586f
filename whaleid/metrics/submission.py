"""Kaggle's metric and file: MAP@5 (and top-1) of answers, and the submission file's check.

The answers themselves are built in similarity/answers.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from whaleid.data.tables import NEW_WHALE

MAP_K = 5  # Kaggle's metric is MAP@5: map5/average_precision score the first 5 labels of an answer
# How many labels an answer holds is the setting predict.top_k: the functions that build or check
# answers take it as `k`, with no default of their own (validate: the shipped default's value).


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
        from whaleid.pipeline import config
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
