"""predict: test-time augmentation, top-5 with a new_whale threshold -> submission.csv (design.md §7).

Inputs:    format/test.csv, boxes/BB_TEST.csv, dedup/known_answers.csv, train/model.keras +
           classes.json, the data folder's sample_submission.csv, test/ and train_only.csv, and
           WORK/tuned_threshold.json when `whaleid evaluate --tune-threshold` wrote one (for this
           head and model); embedding heads: augment/TRAINING_FILE_FINAL.csv + images/ (the gallery)
Artifacts: submission.csv    Image,Id: one row per sample_submission image, in its order, 5 distinct labels
           predictions.csv   per image: the answer, its source (model / known / fallback), top score
           (WORK/submission.csv is a copy, where users look for it)

TTA, the gallery of retrieval heads and the threshold: scoring.py (shared with evaluate). The
gallery holds all known ids, also those split held out of training: a new id needs photos, not a
retrained model; but never the train-only ids of the data folder's train_only.csv (`import-folders
--train-only`): they were only learnt from, and are never an answer. The test photos are scored in chunks of whole batches, each chunk's answers
committed to predict/.partial/ (Run.save_chunk): a killed predict resumes after its last chunk, and
every batch goes through the model at the same size, so a resumed run writes the same files.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..preprocess import augment, split
from ..learning import model as models
from . import rerank, scoring
from ..ranking import submission
from ..pipeline.stage import Run, atomic_path, fault_point
from ..pipeline.stages import CALIBRATION
from ..pipeline.tables import NEW_WHALE, read_test


def photo_jobs(test: pd.DataFrame, boxes: pd.DataFrame, folder: Path) -> list[tuple]:
    """(image, path, box) for scoring.prepare(), for the photos of `test` that have a box (boxes: by Image)."""
    usable = test[test.Image.isin(boxes.index)]
    return [(r.Image, str(folder / r.Image), tuple(int(v) for v in boxes.loc[r.Image, ["x0", "y0", "x1", "y1"]]))
            for r in usable.itertuples()]


class FixedBatch:
    """A model whose every call sees `rows` rows (a short batch padded with zeros): one traced shape,
    and a photo's scores do not depend on which chunk ended where."""

    def __init__(self, model, rows: int):
        self.model, self.rows = model, rows

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < self.rows:
            x = np.concatenate([x, np.zeros((self.rows - n,) + x.shape[1:], x.dtype)])
        return np.asarray(self.model.predict_on_batch(x))[:n]


def scored_chunks(run: Run, model, classes, jobs: list, merge: str, k: int, rerank_chunk=None, never=frozenset()):
    """(image, (ranked ids, their scores) or None, error, top score) per job, in order, chunk by chunk:
    a chunk committed by an interrupted run with the same fingerprint is read back, the others are
    scored and committed. The new_whale threshold is applied afterwards (new_whale.share needs every
    photo's best score). With `rerank_chunk` (rerank.for_predict) each chunk's rankings are re-ranked
    before it is committed. Ids in `never` (train-only) score -1, below any answer."""
    batch = run.setting("predict.batch_size")
    drop = np.array([c in never for c in classes]) if never else None
    fixed = FixedBatch(model, batch * (len(augment.TTA) if run.setting("predict.tta") else 1))
    size = batch * max(1, min(8, -(-len(jobs) // (16 * batch))))  # whole batches, <= 8 of them
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    kept, depth = 0, k if rerank_chunk is None else max(k, run.setting("rerank.candidates"))
    for i, part in enumerate(chunks):
        keys = [job[0] for job in part]
        path = run.partial_path("tta", i)
        scored = run.load_chunk(path, keys)
        if scored is None:
            scored = []
            desc = "TTA + model" + (f" {i + 1}/{len(chunks)}" if len(chunks) > 1 else "")
            for image, probs, error in scoring.class_scores(run, fixed, part, batch, desc):
                if error:
                    scored.append((image, None, error, 0.0))
                else:
                    if drop is not None:
                        probs = np.where(drop, -1.0, probs)
                    scored.append((image, submission.ranked(probs, classes, merge, depth), None,
                                   float(probs.mean(0).max())))
            if rerank_chunk is not None:
                scored = rerank_chunk(scored)
            run.save_chunk(path, keys, scored)
            fault_point("predict.chunk")
        else:
            kept += 1
        yield from scored
    run.partial_stats["tta"] = {"items": len(jobs), "chunk": size, "chunks": len(chunks), "kept": kept,
                                "computed": len(chunks) - kept}
    if kept:
        run.echo(f"resumed: {kept} of {len(chunks)} chunks of test photos kept from the interrupted run")


def run(run: Run) -> dict:
    order, _ = read_test(run.data / "sample_submission.csv")
    test = run.read_csv("format", "test.csv")
    boxes = run.read_csv("boxes", "BB_TEST.csv").set_index("Image")
    known = dict(run.read_csv("dedup", "known_answers.csv")[["Image", "Id"]].itertuples(index=False))
    net = models.load_model(run.upstream("train", "model.keras"))
    gallery = scoring.gallery_files(run.read_csv("augment", "TRAINING_FILE_FINAL.csv"), None,
                                    run.setting("predict.gallery_tta"), run.setting("train.flip_ids"))
    model, classes = scoring.scorer(run, net, gallery)
    merge, k = run.setting("predict.merge"), run.setting("predict.top_k")
    jobs = photo_jobs(test, boxes, run.data / "test")
    scored = []
    rerank_chunk = None
    if run.setting("rerank.method") != "none":
        rerank_chunk = rerank.for_predict(run, run.work / "evaluate" / CALIBRATION,
                                          run.read_csv("format", "train.csv")[["Image", "Id"]])
    never = split.train_only_ids(run)
    for image, ranking, error, top in scored_chunks(run, model, classes, jobs, merge, k, rerank_chunk, never):
        if error:
            run.skip(image, error)
        else:
            scored.append((image, ranking, top))
    share = run.setting("new_whale.share")
    if share > 0:
        thr = submission.share_threshold([scores[0] for _, (_, scores), _ in scored], share)
        run.echo(f"new_whale.share = {share:g}: threshold {thr:.3f} puts new_whale first for that share of the "
                 f"{len(scored)} scored test photos")
    else:
        thr = scoring.threshold(run)
    answers, rows = {}, []
    for image, (labels, scores), top in scored:
        answers[image] = submission.known_first(submission.insert_new_whale(labels, scores, thr, k), known.get(image), k)
        rows.append((image, " ".join(answers[image]), "known" if image in known else "model", top))
    # photos that could not be read still get a valid row: the most common answer shape
    train_ids = run.read_csv("format", "train.csv").Id.value_counts().index.tolist()
    fallback = ([NEW_WHALE] + [i for i in train_ids if i != NEW_WHALE and i not in never])[:k]
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
