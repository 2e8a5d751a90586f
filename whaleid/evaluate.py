"""evaluate: open-set MAP@5 on the validation split, and the new_whale threshold that maximises it.

The validation photos of known ids keep their id; the photos of ids held out of training (split's
`unseen`) and the new_whale photos are all new whales, sampled so that they make up
`evaluate.new_whale_share` of the set (~27%, as in the Kaggle test set). Each photo's box crop
(augment's original variant) goes through the same TTA and merge as predict.

Inputs:    split/split.csv, augment/images/, train/model.keras + classes.json
Artifacts: metrics.json          MAP@5, top-1, the all-new_whale baseline, at the configured threshold
                                 and at the best one of the sweep
           threshold_sweep.csv   MAP@5 for every threshold 0.00 .. 1.00
           val_predictions.csv   Image, truth, answer
`whaleid evaluate --tune-threshold` copies the best threshold to WORK/tuned_threshold.json, which
predict then uses (and says so).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import submission
from .predict import TUNED, class_probabilities
from .stage import Run, Stage, StageError, write_json
from .tables import NEW_WHALE

SWEEP = np.round(np.arange(0.0, 1.0001, 0.01), 2)


def open_set(split: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Image, truth: val photos with their id, plus new whales (unseen ids and new_whale photos)
    sampled to `share` of the result when there are enough of them."""
    val = split[split.subset == "val"].assign(truth=lambda d: d.Id)
    new = split[split.subset.isin(["unseen", "new_whale"])].assign(truth=NEW_WHALE)
    want = int(round(share * len(val) / (1 - share))) if share < 1 else len(new)
    if len(new) > want:
        new = new.sample(n=want, random_state=seed).sort_values("Image")
    return pd.concat([val, new])[["Image", "Id", "truth"]].reset_index(drop=True)


def answers_at(probs: list[np.ndarray], classes: list[str], thr: float, merge: str, k: int) -> list[list[str]]:
    return [submission.answer(p, classes, thr, merge, None, k) for p in probs]


def run(run: Run) -> dict:
    from . import model as models
    if run.setting("model.head") != "softmax":
        raise StageError(f"evaluate for model.head = {run.setting('model.head')} is not built yet")
    split = run.read_csv("split", "split.csv")
    evalset = open_set(split, run.setting("evaluate.new_whale_share"), run.setting("run.seed"))
    if evalset.empty:
        raise StageError("the split has no validation photos to evaluate on (too few photos per id?)")
    folder = run.upstream("augment", "images")
    classes = json.loads(run.upstream("train", "classes.json").read_text())
    model = models.load_model(run.upstream("train", "model.keras"))
    jobs = [(r.Image, str(folder / f"{Path(r.Image).stem}_0.jpg"), None) for r in evalset.itertuples()]
    probs, truths, names = [], [], []
    truth_of = dict(zip(evalset.Image, evalset.truth))
    for image, p, error in class_probabilities(run, model, jobs, run.setting("predict.batch_size"), "TTA + model"):
        if error:
            run.skip(image, error)
            continue
        probs.append(p)
        truths.append(truth_of[image])
        names.append(image)
    merge, k = run.setting("predict.merge"), run.setting("predict.top_k")
    sweep = []
    for thr in SWEEP:
        sweep.append((float(thr), submission.map5(truths, answers_at(probs, classes, thr, merge, k))))
    sweep = pd.DataFrame(sweep, columns=["threshold", "map5"])
    best = sweep.loc[sweep.map5.idxmax()]
    configured = run.setting("new_whale.threshold")
    preds = answers_at(probs, classes, configured, merge, k)
    at_configured = submission.scores(truths, preds)
    at_best = submission.scores(truths, answers_at(probs, classes, float(best.threshold), merge, k))
    metrics = {"threshold": configured, **at_configured,
               "best_threshold": float(best.threshold), "best_map5": at_best["map5"],
               "best_top1": at_best["top1"], "merge": merge, "tta": run.setting("predict.tta"),
               "known_ids_in_eval": int(evalset[evalset.truth != NEW_WHALE].truth.nunique())}
    run.write_json("metrics.json", metrics)
    run.write_csv("threshold_sweep.csv", sweep)
    run.write_csv("val_predictions.csv", pd.DataFrame({"Image": names, "truth": truths,
                                                       "answer": [" ".join(p) for p in preds]}))
    return {"map5": metrics["map5"], "best_threshold": metrics["best_threshold"], "best_map5": metrics["best_map5"],
            "images": len(truths)}


def tune(work: Path) -> float:
    """Store the sweep's best threshold where predict looks for it."""
    metrics = json.loads((Path(work) / "evaluate" / "metrics.json").read_text())
    write_json(Path(work) / TUNED, {"threshold": metrics["best_threshold"], "map5": metrics["best_map5"],
                                    "source": str(Path(work) / "evaluate" / "threshold_sweep.csv")})
    return metrics["best_threshold"]


STAGE = Stage("evaluate", run, artifacts=("metrics.json", "threshold_sweep.csv", "val_predictions.csv"),
              settings=("run.image_size", "run.seed", "augment.margin", "augment.crop_max",
                        "augment.blur_sigma_max", "model.head", "predict.top_k", "predict.tta",
                        "predict.merge", "predict.batch_size", "new_whale.threshold",
                        "evaluate.new_whale_share"),
              upstream=("split", "augment", "train"))
