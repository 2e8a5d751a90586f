"""evaluate: open-set MAP@5 on the validation split, and the new_whale threshold that maximises it.

The validation photos of known ids keep their id; the photos of ids held out of training (split's
`unseen`) and the new_whale photos are all new whales, sampled so that they make up
`evaluate.new_whale_share` of the set (~27%, as in the Kaggle test set). Each photo's box crop
(augment's original variant) goes through the same TTA and merge as predict.

The photos are ranked by inference/ranking.py, as predict and identify rank theirs; the gallery is
the training split's photos, so the held-out ids really are new; train-only individuals
(import-folders --train-only) are never an answer, as in predict, so the figures, the threshold and
the fusion are those of the problem predict solves (their photos are new whales here). With encounters (split.csv's
Encounter column) no query is scored by a photo of its own encounter, so the threshold and the
fusion are fitted across encounters, as a researcher's new photos come. With rerank.method = local the
fusion is fitted here (cross-fitted on validation halves) and written for predict and identify.

Every head also gets the verification view of seeds 002/003 (verification.py): the AUC of (query, id)
pairs (each known photo with its true id; every photo, new whales too, with a random id not its own)
and precision / recall / F1 of "same" = score >= threshold, at the configured and at the
best (tuned) threshold; and with evaluate.one_shot = N (`--one-shot N`), N-way one-shot accuracy:
each validation or held-out photo against one other photo of its id and N-1 photos of N-1 other ids,
compared photo to photo (softmax: p_a . p_b; see similarity/gallery.py), also reported for the held-out ids alone.

Inputs:    split/split.csv, augment/images/ + TRAINING_FILE_FINAL.csv, train/model.keras + classes.json
Artifacts: metrics.json          MAP@5, top-1, the all-new_whale baseline, at the configured threshold
                                 and at the best one of the sweep; verification; one_shot
           threshold_sweep.csv   MAP@5 for every threshold 0.00 .. 1.00 and 1.01 (above every score)
           val_predictions.csv   Image, truth, answer; top_id, top_score: the embedding's best id and score
                                 (before the threshold), what identify's review page says a score means
           calibration.json      rerank.method = local: the fusion fitted on these validation queries
                                 (similarity/fusion.py; predict and identify read it); metrics.json's "rerank" compares
                                 MAP@5 and top-1 without and with re-ranking (cross-fitted halves)
`whaleid evaluate --tune-threshold` copies the best threshold to WORK/tuned_threshold.json, which
predict then uses (and says so).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from whaleid.data.tables import NEW_WHALE, read_sides, read_train_only
from whaleid.inference import ranking
from whaleid.inference.embedding import Embedder
from whaleid.learning import model as models
from whaleid.metrics import submission, verification
from whaleid.pipeline.stage import Run, StageError
from whaleid.similarity import answers, local
from whaleid.similarity.fusion import CALIBRATION, top1
from whaleid.similarity.gallery import gallery_files
from whaleid.similarity.threshold import model_digest

# 0.00 .. 1.00, and 1.01: above every score (probabilities and similarities reach 1.0 in float32),
# new_whale first everywhere (then the model's first ids), which scores at least the all-new_whale
# baseline (new_whale alone): the best threshold never does worse than that baseline
SWEEP = np.round(np.append(np.arange(0.0, 1.0001, 0.01), 1.01), 2)


def open_set(split: pd.DataFrame, share: float, seed: int, never=frozenset()) -> pd.DataFrame:
    """Image, truth: val photos with their id, plus new whales (unseen ids and new_whale photos)
    sampled to `share` of the result when there are enough of them. `never` (train-only ids): as in
    predict they are never an answer, so their val photos are new whales too."""
    val = split[(split.subset == "val") & ~split.Id.isin(never)].assign(truth=lambda d: d.Id)
    new = split[split.subset.isin(["unseen", "new_whale"]) | ((split.subset == "val") & split.Id.isin(never))]
    new = new.assign(truth=NEW_WHALE)
    want = int(round(share * len(val) / (1 - share))) if share < 1 else len(new)
    if len(new) > want:
        new = new.sample(n=want, random_state=seed).sort_values("Image")
    return pd.concat([val, new])[["Image", "Id", "truth"]].reset_index(drop=True)


def answers_at(rankings: list[tuple[list[str], list[float]]], thr: float, k: int) -> list[list[str]]:
    return [answers.insert_new_whale(labels, scores, thr, k) for labels, scores in rankings]


def run(run: Run) -> dict:
    split = run.read_csv("split", "split.csv")
    never = read_train_only(run.data / "train_only.csv")
    evalset = open_set(split, run.setting("evaluate.new_whale_share"), run.setting("run.seed"), never)
    if never:
        run.echo(f"validation as predict ranks: the {len(never)} train-only individuals are never an answer "
                 f"({int(((split.subset == 'val') & split.Id.isin(never)).sum())} of their validation photos "
                 f"can only be new whales); {int((evalset.truth != NEW_WHALE).sum())} validation photos of answerable ids")
    if evalset.empty:
        raise StageError("the split has no validation photos to evaluate on (too few photos per id?)")
    net = models.load_model(run.upstream("train", "model.keras"))
    files = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
    gallery = gallery_files(files, split.Image[split.subset == "train"], run.setting("predict.gallery_tta"),
                            run.setting("train.flip_ids"))
    encounters = ranking.photo_rule(run, dict(zip(split.Image, split.Encounter)) if "Encounter" in split.columns else None,
                                    read_sides(run.data))
    signals = ranking.signals(run, gallery, fitted=True, encounters=encounters)
    ranker = ranking.Ranker(run, net, gallery, run.setting("predict.top_k"), never=never, signals=signals,
                            encounters=encounters)
    folder, original = run.upstream("augment", "images"), originals(files)
    jobs = [(r.Image, str(folder / original[r.Image]), None) for r in evalset.itertuples()]
    truth_of = dict(zip(evalset.Image, evalset.truth))
    ranked = ranker.rank(jobs, truths=truth_of, keep_scores=True)
    for r in ranked:
        if r.error:
            run.skip(r.image, r.error)
    ranked = [r for r in ranked if r.error is None]
    truths = [truth_of[r.image] for r in ranked]
    known_ids = int(evalset[evalset.truth != NEW_WHALE].truth.nunique())
    metrics, sweep = measure(run, ranked, truths, ranker.classes, signals, known_ids)
    if run.setting("evaluate.one_shot"):
        metrics["one_shot"] = one_shot(run, net, split, run.setting("evaluate.one_shot"), original)
    return write(run, metrics, sweep, ranked, truths)


def measure(run: Run, ranked: list, truths: list[str], classes: list[str], signals: list,
            known_ids: int) -> tuple[dict, pd.DataFrame]:
    """(metrics.json's figures, the threshold sweep) from the ranked validation photos."""
    k, configured = run.setting("predict.top_k"), run.setting("new_whale.threshold")
    rankings, plain = [r.ranking for r in ranked], [r.plain for r in ranked]  # plain: the embedding's
    rerank_info = {"method": "none"}
    if signals:  # (similarity/local.py) fused, fitted on the other half of the queries
        rerank_info = {"method": signals[0].name, "candidates": signals[0].candidates,
                       "without": best_of(plain, truths, k), "with": best_of(rankings, truths, k),
                       "fusion": signals[0].calibration()}
        rerank_info["summary"] = local.summary_line(rerank_info)
    sweep = pd.DataFrame([(float(thr), submission.map5(truths, answers_at(rankings, thr, k))) for thr in SWEEP],
                         columns=["threshold", "map5"])
    best = sweep.loc[sweep.map5.idxmax()]
    at_best = submission.scores(truths, answers_at(rankings, float(best.threshold), k))
    # new_whale.share's rule (predict), here with the share of new whales the validation set has
    share = run.setting("new_whale.share") or run.setting("evaluate.new_whale_share")
    by_share = answers.share_threshold([scores[0] for _, scores in rankings], share)
    at_share = submission.scores(truths, answers_at(rankings, by_share, k))
    metrics = {"threshold": configured, **submission.scores(truths, answers_at(rankings, configured, k)),
               "best_threshold": float(best.threshold), "best_map5": at_best["map5"],
               "best_top1": at_best["top1"], "share": share, "share_threshold": by_share,
               "share_map5": at_share["map5"], "merge": run.setting("predict.merge"), "tta": run.setting("predict.tta"),
               "known_ids_in_eval": known_ids, "head": run.setting("model.head"), "model": model_digest(run),
               "rerank": rerank_info,
               "verification": verify([r.scores for r in ranked], truths, classes, configured, float(best.threshold),
                                      run.setting("run.seed"))}
    return metrics, sweep


def write(run: Run, metrics: dict, sweep: pd.DataFrame, ranked: list, truths: list[str]) -> dict:
    k = run.setting("predict.top_k")
    preds = answers_at([r.ranking for r in ranked], metrics["threshold"], k)
    rerank_info = metrics["rerank"]
    run.write_json("metrics.json", metrics)
    run.write_json(CALIBRATION, rerank_info.get("fusion", {"method": "none"}))
    run.write_csv("threshold_sweep.csv", sweep)
    run.write_csv("val_predictions.csv", pd.DataFrame({"Image": [r.image for r in ranked], "truth": truths,
                                                       "answer": [" ".join(p) for p in preds],
                                                       "top_id": [r.plain[0][0] for r in ranked],
                                                       "top_score": [round(float(r.plain[1][0]), 4) for r in ranked]}))
    out = {"map5": metrics["map5"], "best_threshold": metrics["best_threshold"], "best_map5": metrics["best_map5"],
           **{f"{w}_rerank_{m}": rerank_info[w][m] for w in ("without", "with") if w in rerank_info
              for m in ("map5", "closed_top1")},
           "share_map5": metrics["share_map5"], "images": len(truths), "auc": metrics["verification"]["auc"]}
    if "one_shot" in metrics:
        out[f"one_shot_{metrics['one_shot']['n_way']}_way"] = metrics["one_shot"]["accuracy"]
    return out


def best_of(rankings: list, truths: list[str], k: int) -> dict:
    """MAP@5 at the sweep's best threshold, its open-set top-1, and closed-set top-1 (known ids' photos:
    is the best-ranked id right), for comparing rankings with and without re-ranking."""
    runs = [(float(thr), submission.scores(truths, answers_at(rankings, thr, k))) for thr in SWEEP]
    thr, best = max(runs, key=lambda r: r[1]["map5"])
    return {"map5": best["map5"], "threshold": thr, "top1": best["top1"], "closed_top1": _rounded(top1(rankings, truths))}


def _rounded(x: float):
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def verify(probs: list[np.ndarray], truths: list[str], classes: list[str], configured: float, best: float,
           seed: int) -> dict:
    """Verification AUC and precision / recall / F1 at both thresholds, on (query, id) pairs scored
    by the TTA mean (the score the new_whale threshold is compared with)."""
    if not probs:
        return {"pairs": 0, "auc": None}
    mean = np.stack([np.atleast_2d(p).mean(0) for p in probs])
    labels, scores = verification.id_pairs(mean, truths, classes, np.random.default_rng([seed, 0xA0C]))
    return {"pairs": int(len(labels)), "same_id_pairs": int(labels.sum()),
            "auc": _rounded(verification.roc_auc(labels, scores)),
            "at_threshold": verification.precision_recall_f1(labels, scores, configured),
            "at_best_threshold": verification.precision_recall_f1(labels, scores, best)}


def originals(files: pd.DataFrame) -> dict[str, str]:
    """Photo -> augment's file of its original (unaugmented) crop, from TRAINING_FILE_FINAL."""
    first = files[files.variant == "original"]
    return dict(zip(first.Image, first.File))


def one_shot(run: Run, net, split: pd.DataFrame, n_way: int, original: dict[str, str]) -> dict:
    """N-way one-shot accuracy over the labelled photos (training, validation and held-out ids): each
    validation or held-out photo is a query; photos compared one to one (originals, no TTA)."""
    pool = split[split.subset.isin(["train", "val", "unseen"])].reset_index(drop=True)
    queries = np.flatnonzero(pool.subset.isin(["val", "unseen"]).to_numpy())
    tasks = verification.one_shot_tasks(pool.Id, queries, n_way, np.random.default_rng([run.setting("run.seed"), n_way]))
    out = {"n_way": n_way, "tasks": int(len(tasks.query)), "accuracy": None, "unseen_tasks": 0, "unseen_accuracy": None}
    if not len(tasks.query):
        run.echo(f"one-shot: no {n_way}-way task can be built ({pool.Id.nunique()} ids with photos, queries need "
                 f"another photo of their id)")
        return out
    used = np.unique(np.concatenate([tasks.query, tasks.candidates.ravel()]))
    folder = run.upstream("augment", "images")
    embedder = Embedder(net)
    got = embedder.encode_files([str(folder / original[i]) for i in pool.Image.iloc[used]],
                                run.setting("run.image_size"), run.setting("predict.batch_size"),
                                run.session.progress, f"[{run.stage.name}] one-shot photos")
    vectors = np.zeros((len(pool), got.shape[1]), np.float32)
    vectors[used] = got
    n = tasks.candidates.shape[1]
    sims = embedder.pair_similarity(np.repeat(vectors[tasks.query], n, axis=0),
                                    vectors[tasks.candidates.ravel()]).reshape(-1, n)
    hit = np.argmax(sims, axis=1) == tasks.correct
    unseen = (pool.subset.to_numpy()[tasks.query] == "unseen")
    out.update(accuracy=_rounded(hit.mean()), unseen_tasks=int(unseen.sum()),
               unseen_accuracy=_rounded(hit[unseen].mean()) if unseen.any() else None)
    return out
