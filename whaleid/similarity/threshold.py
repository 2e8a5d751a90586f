"""Which new_whale threshold applies: new_whale.share's rule, the one `evaluate --tune-threshold`
stored for this head, model and re-ranking, or new_whale.threshold. One policy for evaluate's
sweep, predict and identify (inference/ranking.py calls it)."""
from __future__ import annotations

import json
from pathlib import Path

from whaleid.pipeline.files import write_json
from whaleid.similarity.answers import share_threshold
from whaleid.similarity.fusion import fitted_for

TUNED = "tuned_threshold.json"  # WORK/tuned_threshold.json, written by `evaluate --tune-threshold`


def model_digest(run) -> str | None:
    """The sha256 of the trained model, as train's manifest records it."""
    m = run.session.manifest("train") or {}
    return m.get("artifacts", {}).get("model.keras")


def score_scale(method: str, fusion: str | None) -> str:
    """What the scores a threshold compares are: the embedding's, or a fusion's (rerank.fusion)."""
    return "rerank.method = none" if method == "none" else f"rerank.method = {method}, rerank.fusion = {fusion or 'average'}"


def tuned_or_configured(run) -> float:
    """The tuned threshold when evaluate tuned it for this head and model, else new_whale.threshold: a
    threshold on softmax probabilities means nothing for embedding similarities, and vice versa."""
    tuned = run.work / TUNED
    configured = run.setting("new_whale.threshold")
    if not tuned.exists():
        return configured
    info = json.loads(tuned.read_text())
    value = float(info["threshold"])
    head, model, fused = info.get("head"), info.get("model"), score_scale(info.get("rerank", "none"), info.get("fusion"))
    wanted = score_scale(run.setting("rerank.method"), run.setting("rerank.fusion"))
    if head not in (None, run.setting("model.head")) or model not in (None, model_digest(run)) or \
            fused != wanted:  # fused scores (similarity/fusion.py) are another scale
        what = (f"the {head} head" if head != run.setting("model.head") else
                fused if fused != wanted else "another trained model")
        run.echo(f"{tuned} was tuned for {what}: ignoring it, using new_whale.threshold = {configured} "
                 f"(run whaleid evaluate --tune-threshold again)")
        return configured
    run.echo(f"using the tuned new_whale threshold {value:.3f} from {tuned} "
             f"(delete it to use new_whale.threshold = {configured})")
    return value


def choose_threshold(run, best_scores: list[float]) -> float:
    """predict's and identify's threshold: with new_whale.share > 0, the one that puts new_whale first
    for that share of these photos (their best scores); else tuned_or_configured."""
    share = run.setting("new_whale.share")
    if share > 0 and len(best_scores):
        thr = share_threshold(best_scores, share)
        run.echo(f"new_whale.share = {share:g}: threshold {thr:.3f} puts new_whale first for that share of the "
                 f"{len(best_scores)} scored photos")
        return thr
    return tuned_or_configured(run)


def tuning_obstacles(share: float, validation_new_share: float) -> tuple[str | None, str | None]:
    """(why a tuned threshold would not be used: new_whale.share places it; why the sweep says nothing
    about the threshold: the validation has no new whales), each None when it does not apply."""
    placed = (f"new_whale.share = {share:g} places it in predict (new_whale first for that share of the test "
              f"photos); set new_whale.share = 0 to use a tuned one") if share else None
    untunable = None if validation_new_share else (
        "the validation has no new whales (no new_whale rows and no held-out ids), so MAP@5 says nothing about the "
        "new_whale threshold; set split.unseen_ids, e.g. --set split.unseen_ids=0.2, or new_whale.share")
    return placed, untunable


def tune(work: Path) -> float:
    """Store evaluate's best threshold of the sweep where predict and identify look for it."""
    metrics = json.loads((Path(work) / "evaluate" / "metrics.json").read_text())
    write_json(Path(work) / TUNED, {"threshold": metrics["best_threshold"], "map5": metrics["best_map5"],
                                    "head": metrics.get("head"), "model": metrics.get("model"),
                                    "rerank": metrics.get("rerank", {}).get("method", "none"),
                                    "fusion": fitted_for(metrics.get("rerank", {}).get("fusion") or {}),
                                    "source": str(Path(work) / "evaluate" / "threshold_sweep.csv")})
    return metrics["best_threshold"]
