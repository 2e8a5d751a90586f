"""predict: test-time augmentation, top-5 with a new_whale threshold -> submission.csv (design.md §7).

Inputs:    format/test.csv, boxes/BB_TEST.csv, dedup/known_answers.csv, train/model.keras +
           classes.json, the data folder's sample_submission.csv, test/ and train_only.csv, and
           WORK/tuned_threshold.json when `whaleid evaluate --tune-threshold` wrote one (for this
           head and model); embedding heads: augment/TRAINING_FILE_FINAL.csv + images/ (the gallery)
Artifacts: submission.csv    Image,Id: one row per sample_submission image, in its order, 5 distinct labels
           predictions.csv   per image: the answer, its source (model / known / fallback), top score
           (WORK/submission.csv is a copy, where users look for it)

The ranking (TTA, the gallery of retrieval heads, re-ranking) is inference/ranking.py's, shared with
evaluate and identify; the threshold is similarity/threshold.py's. The
gallery holds all known ids, also those split held out of training: a new id needs photos, not a
retrained model; but never the train-only ids of the data folder's train_only.csv (`import-folders
--train-only`): they were only learnt from, and are never an answer. The test photos are scored in chunks of whole batches, each chunk's answers
committed to predict/.partial/ (Run.save_chunk): a killed predict resumes after its last chunk, and
every batch goes through the model at the same size, so a resumed run writes the same files.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from whaleid.data.tables import NEW_WHALE, read_encounters, read_sides, read_test, read_train_only
from whaleid.inference import ranking
from whaleid.learning import model as models
from whaleid.metrics import submission
from whaleid.pipeline.stage import Run, atomic_path, fault_point
from whaleid.similarity import answers
from whaleid.similarity.gallery import gallery_files
from whaleid.similarity.threshold import choose_threshold


def photo_jobs(test: pd.DataFrame, boxes: pd.DataFrame, folder: Path) -> list[tuple]:
    """(image, path, box) for embedding.prepare(), for the photos of `test` that have a box (boxes: by Image)."""
    usable = test[test.Image.isin(boxes.index)]
    return [(r.Image, str(folder / r.Image), tuple(int(v) for v in boxes.loc[r.Image, ["x0", "y0", "x1", "y1"]]))
            for r in usable.itertuples()]


def scored_chunks(run: Run, ranker: ranking.Ranker, jobs: list):
    """(image, (ranked ids, their scores) or None, error, top score) per job, in order, chunk by chunk:
    a chunk committed by an interrupted run with the same fingerprint is read back, the others are
    ranked (re-ranking included) and committed. The new_whale threshold is applied afterwards
    (new_whale.share needs every photo's best score)."""
    batch = run.setting("predict.batch_size")
    size = batch * max(1, min(8, -(-len(jobs) // (16 * batch))))  # whole batches, <= 8 of them
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    kept = 0
    for i, part in enumerate(chunks):
        keys = [job[0] for job in part]
        path = run.partial_path("tta", i)
        scored = run.load_chunk(path, keys)
        if scored is None:
            desc = "TTA + model" + (f" {i + 1}/{len(chunks)}" if len(chunks) > 1 else "")
            scored = [(r.image, r.ranking, r.error, r.top) for r in ranker.rank(part, desc)]
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
    boxes = run.read_csv("boxes", "BB_TEST.csv").set_index("Image")
    known = dict(run.read_csv("dedup", "known_answers.csv")[["Image", "Id"]].itertuples(index=False))
    train = run.read_csv("format", "train.csv")
    gallery = gallery_files(run.read_csv("augment", "TRAINING_FILE_FINAL.csv"), None,
                            run.setting("predict.gallery_tta"), run.setting("train.flip_ids"))
    never, k = read_train_only(run.data / "train_only.csv"), run.setting("predict.top_k")
    # a test photo never meets its own encounter's photos, nor (predict.sides = same) its other flank
    encounters = ranking.photo_rule(run, read_encounters(run.data), read_sides(run.data))
    signals = ranking.signals(run, train[["Image", "Id"]], ("keypoints", "test_keypoints"), encounters=encounters)
    ranker = ranking.Ranker(run, models.load_model(run.upstream("train", "model.keras")), gallery, k,
                            never=never, signals=signals, fixed_rows=True, encounters=encounters)
    scored = []
    for image, ranked, error, top in scored_chunks(run, ranker, photo_jobs(run.read_csv("format", "test.csv"), boxes,
                                                                           run.data / "test")):
        if error:
            run.skip(image, error)
        else:
            scored.append((image, ranked, top))
    thr = choose_threshold(run, [scores[0] for _, (_, scores), _ in scored])
    answers_of, rows = {}, []
    for image, (labels, scores), top in scored:
        answers_of[image] = answers.known_first(answers.insert_new_whale(labels, scores, thr, k), known.get(image), k)
        rows.append((image, " ".join(answers_of[image]), "known" if image in known else "model", top))
    # photos that could not be read still get a valid row: the most common answer shape
    train_ids = train.Id.value_counts().index.tolist()
    fallback = ([NEW_WHALE] + [i for i in train_ids if i != NEW_WHALE and i not in never])[:k]
    for image in order.Image:
        if image not in answers_of:
            answers_of[image] = answers.known_first(fallback, known.get(image), k)
            rows.append((image, " ".join(answers_of[image]), "known" if image in known else "fallback", 0.0))
    sub = pd.DataFrame({"Image": order.Image, "Id": [" ".join(answers_of[i]) for i in order.Image]})
    return write(run, sub, rows, order, known, thr, k)


def write(run: Run, sub: pd.DataFrame, rows: list, order: pd.DataFrame, known: dict, thr: float, k: int) -> dict:
    """submission.csv (checked first), predictions.csv, and the copy WORK/submission.csv."""
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
