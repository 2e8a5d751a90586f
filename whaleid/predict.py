"""predict: test-time augmentation, top-5 with a new_whale threshold -> submission.csv (design.md §7).

Inputs:    format/test.csv, boxes/BB_TEST.csv, dedup/known_answers.csv, train/model.keras +
           classes.json, the data folder's sample_submission.csv and test/, and
           WORK/tuned_threshold.json when `whaleid evaluate --tune-threshold` wrote one (for this
           head and model); embedding heads: augment/TRAINING_FILE_FINAL.csv + images/ (the gallery)
Artifacts: submission.csv    Image,Id: one row per sample_submission image, in its order, 5 distinct labels
           predictions.csv   per image: the answer, its source (model / known / fallback), top score
           (WORK/submission.csv is a copy, where users look for it)

TTA, the gallery of retrieval heads and the threshold: scoring.py (shared with evaluate). The
gallery holds all known ids, also those split held out of training: a new id needs photos, not a
retrained model.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from . import model as models, scoring, submission
from .stage import Run, atomic_path
from .tables import NEW_WHALE, read_test


def photo_jobs(test: pd.DataFrame, boxes: pd.DataFrame, folder: Path) -> list[tuple]:
    """(image, path, box) for scoring.prepare(), for the photos of `test` that have a box (boxes: by Image)."""
    usable = test[test.Image.isin(boxes.index)]
    return [(r.Image, str(folder / r.Image), tuple(int(v) for v in boxes.loc[r.Image, ["x0", "y0", "x1", "y1"]]))
            for r in usable.itertuples()]


def run(run: Run) -> dict:
    order, _ = read_test(run.data / "sample_submission.csv")
    test = run.read_csv("format", "test.csv")
    boxes = run.read_csv("boxes", "BB_TEST.csv").set_index("Image")
    known = dict(run.read_csv("dedup", "known_answers.csv")[["Image", "Id"]].itertuples(index=False))
    net = models.load_model(run.upstream("train", "model.keras"))
    gallery = scoring.gallery_files(run.read_csv("augment", "TRAINING_FILE_FINAL.csv"), None,
                                    run.setting("predict.gallery_tta"))
    model, classes = scoring.scorer(run, net, gallery)
    thr, merge, k = scoring.threshold(run), run.setting("predict.merge"), run.setting("predict.top_k")
    jobs = photo_jobs(test, boxes, run.data / "test")
    answers, rows = {}, []
    for image, probs, error in scoring.class_scores(run, model, jobs, run.setting("predict.batch_size"), "TTA + model"):
        if error:
            run.skip(image, error)
            continue
        labels = submission.answer(probs, classes, thr, merge, known.get(image), k)
        answers[image] = labels
        rows.append((image, " ".join(labels), "known" if image in known else "model", float(probs.mean(0).max())))
    # photos that could not be read still get a valid row: the most common answer shape
    train_ids = run.read_csv("format", "train.csv").Id.value_counts().index.tolist()
    fallback = ([NEW_WHALE] + [i for i in train_ids if i != NEW_WHALE])[:k]
    for image in order.Image:
        if image not in answers:
            answers[image] = submission.known_first(fallback, known.get(image), k)
            rows.append((image, " ".join(answers[image]), "known" if image in known else "fallback", 0.0))
    sub = pd.DataFrame({"Image": order.Image, "Id": [" ".join(answers[i]) for i in order.Image]})
    submission.validate(sub, list(order.Image), k, source="submission")
    run.write_csv("submission.csv", sub)
    run.write_csv("predictions.csv", pd.DataFrame(rows, columns=["Image", "Id", "source", "top_score"]))
    with atomic_path(run.work / "submission.csv") as tmp:
        shutil.copyfile(run.path("submission.csv"), tmp)
    first = sub.Id.str.split().str[0]
    stats = {"images": len(sub), "new_whale_first": int((first == NEW_WHALE).sum()),
             "known_answers": int(sum(1 for i in order.Image if i in known)),
             "fallback": int(sum(1 for r in rows if r[2] == "fallback")), "threshold": round(thr, 4)}
    run.echo(f"wrote {run.work / 'submission.csv'}: {stats['images']} images, new_whale first in "
             f"{stats['new_whale_first']}, {stats['known_answers']} known answers, threshold {thr:.3f}")
    return stats
