"""identify: a batch of new photos against the catalogue the model was trained on, for the photo-ID
researcher's daily loop (issue 24): rank, review (review.py), accept (accept.py), repeat.

    whaleid identify --work WORK --photos DIR [--batch NAME] [--top 5]

Three stages of the ordinary stage cache (stage.py), so a changed model or setting recomputes exactly
what depends on it and a second batch recomputes nothing it shares with the first:
  gallery            the catalogue's vectors: every photo of a known id in augment's files (what
                     predict compares test photos with), embedded once. Upstream: augment, train.
  gallery_added      the vectors of the photos `identify --accept` added since (WORK/catalogue/), so
                     a confirmed photo is a candidate in the next batch without retraining.
  identify/<batch>   WORK/identify/<batch>/: every file under DIR (nested folders, any name; files
                     that are not readable photos are skipped and listed in skipped.csv) gets a tail
                     box (identify.boxes: detected as the catalogue's were, or the whole photo when
                     the catalogue's boxes were imported), a crop, TTA scores against the catalogue
                     (scoring.py, as predict scores: the same head and merge; rerank.method = local
                     re-ranks as predict does, local.py), the new_whale threshold predict would use,
                     and each candidate's best matching catalogue photo.
Artifacts of a batch: photos.csv (photo, source path, crop, box), matches.csv (photo, rank, id,
score, precision, new_individual, catalogue_photo), vectors.npy, crops/, review.html. No data folder
is read (CatalogueSession): the model, augment's crops and WORK's own files are all identify needs.
"""
from __future__ import annotations

import io
import re
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from . import local, review
from ..learning import model as models
from ..pipeline import config, images
from ..pipeline.files import StageError, work_lock, write_bytes
from ..pipeline.stage import Run, Session, Stage, Status
from ..pipeline.stages import DETECT_SETTINGS, TTA_SETTINGS, TUNED
from ..pipeline.workfolder import read_record
from ..preprocess import augment, boxes
from ..ranking import submission
from ..scoring import gallery_cache, scoring
from .accept import ADDED, BATCHES, CATALOGUE, added_files

EMBED_SETTINGS = ("run.image_size", "predict.batch_size", "model.head")
RERANK = ("rerank.*", "keypoints.*")  # rerank.method = local: the batch re-ranked as predict does (local.py)


def _save_vectors(run: Run, name: str, vectors: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vectors, np.float32))
    write_bytes(run.path(name), buf.getvalue())


def _embed(run: Run, net, paths: list[str], what: str) -> np.ndarray:
    if not paths:
        return np.zeros((0, 0), np.float32)
    return scoring.Embedder(net).encode_files(paths, run.setting("run.image_size"), run.setting("predict.batch_size"),
                                              run.session.progress, f"[{run.stage.name}] embed {what}")


def gallery_run(run: Run) -> dict:
    files = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
    gallery = scoring.gallery_files(files, None, run.setting("predict.gallery_tta"), run.setting("train.flip_ids"))
    if gallery.empty:
        raise StageError("the catalogue is empty: augment's files hold no photo of a known id")
    folder = run.upstream("augment", "images")
    net = models.load_model(run.upstream("train", "model.keras"))
    # shared with evaluate and predict (scoring/gallery_cache.py): what they embedded is not embedded again
    vectors = gallery_cache.vectors(run, list(gallery.File),
                                    lambda files: _embed(run, net, [str(folder / f) for f in files], "catalogue"))
    run.write_csv("gallery.csv", gallery.assign(path=[f"augment/images/{f}" for f in gallery.File]))
    _save_vectors(run, "vectors.npy", vectors)
    run.echo(f"catalogue: {len(gallery)} files of {gallery.Image.nunique()} photos, {gallery.Id.nunique()} ids")
    return {"files": len(gallery), "photos": int(gallery.Image.nunique()), "ids": int(gallery.Id.nunique())}


def _catalogue_inputs(session: Session) -> dict[str, Path]:
    folder = session.work / CATALOGUE
    return {f"{CATALOGUE}/{n}": folder / n for n in (ADDED, "crops") if (folder / n).exists()}


def added_run(run: Run) -> dict:
    """The accepted photos' crops (WORK/catalogue/crops/), embedded; those augment already holds (a
    data folder grown with --into and preprocessed again) are left to the gallery stage."""
    added = added_files(run.work)
    known = set(run.read_csv("gallery", "gallery.csv").Image)
    added = added[~added.Image.isin(known)].reset_index(drop=True)
    net = models.load_model(run.upstream("train", "model.keras"))
    vectors = _embed(run, net, [str(run.work / CATALOGUE / c) for c in added.crop], "accepted photos")
    table = pd.DataFrame({"File": added.crop, "Image": added.Image, "Id": added.Id,
                          "path": [f"{CATALOGUE}/{c}" for c in added.crop]})
    run.write_csv("gallery.csv", table)
    _save_vectors(run, "vectors.npy", vectors)
    return {"photos": len(table), "ids": int(table.Id.nunique())}


GALLERY = Stage("gallery", gallery_run, artifacts=("gallery.csv", "vectors.npy"),
                settings=EMBED_SETTINGS + ("predict.gallery_tta", "train.flip_ids"), upstream=("augment", "train"))
GALLERY_ADDED = Stage("gallery_added", added_run, artifacts=("gallery.csv", "vectors.npy"),
                      settings=EMBED_SETTINGS, upstream=("train", "gallery"), extra_inputs=_catalogue_inputs)


# ---------------------------------------------------------------- one batch of new photos

def batch_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}", name or ""):
        raise StageError(f"batch name {name!r}: use letters, digits, '.', '_' and '-' (e.g. --batch 2026-12-03)")
    return name


def list_photos(folder: Path) -> list[tuple[str, str]]:
    """(name relative to folder, path) of every file under it, nested folders included, hidden ones not."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), str(p.resolve())))
    return out


def train_only_file(work: Path) -> Path | None:
    """The train_only.csv of the data folder WORK was run with (`import-folders --train-only`: individuals
    learnt from only), when it is there: as in predict, they are never a candidate."""
    data = read_record(work).get("data")
    path = Path(data) / "train_only.csv" if data else None
    return path if path is not None and path.is_file() else None


def train_only_ids(run: Run) -> set[str]:
    path = train_only_file(run.work)
    if path is None:
        recorded = ((run.session.manifest("split") or {}).get("inputs") or {}).get("data/train_only.csv")
        if recorded:
            run.echo("WARNING: the model was trained with a train_only.csv, and the data folder that holds it is not "
                     "where WORK remembers it: its train-only individuals may be named as candidates")
        return set()
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return set(table.Id) if "Id" in table.columns else set()


def _extra_inputs(photos: Path, session: Session) -> dict[str, Path]:
    out = {"photos": photos, **_catalogue_inputs(session)}
    for name in (TUNED,):
        if (session.work / name).exists():
            out[name] = session.work / name
    if train_only_file(session.work) is not None:
        out["train_only.csv"] = train_only_file(session.work)
    for name in ("metrics.json", "val_predictions.csv"):  # the scores' meaning (review.calibration)
        if (session.dir("evaluate") / name).exists():
            out[f"evaluate/{name}"] = session.dir("evaluate") / name
    if local.enabled(lambda key: config.get(session.cfg, key)):
        out.update(local.inputs(session))
    return out


def batch_stage(batch: str, photos: Path) -> Stage:
    photos = Path(photos).resolve()
    return Stage(f"{BATCHES}/{batch_name(batch)}", partial(batch_run, photos=photos),
                 artifacts=("photos.csv", "matches.csv", "vectors.npy", "crops/", "review.html"),
                 settings=TTA_SETTINGS + DETECT_SETTINGS + RERANK + ("augment.jpeg_quality", "boxes.import_csv",
                                                                     "identify.*"),
                 upstream=("boxes", "augment", "train", "gallery", "gallery_added"),
                 extra_inputs=partial(_extra_inputs, photos))


def _crop_photo(job, detect: dict, margin: float, size: int, thumb: int, quality: int, out: Path):
    """Worker: (index, box + method, thumbnail JPEG bytes, error) for one file: its tail box, its crop
    at the model's size written to out/<index>.jpg, and a sharper crop for the review page."""
    index, _, path = job
    try:
        if detect is None:  # the whole photo, as the catalogue's imported boxes had it
            box, method = [0, 0, *images.image_size(Path(path))], "whole-photo"
        else:
            *box, method = boxes.detect_box_file(path, **detect)
        rgb, local = augment.decode_for_crop(Path(path), tuple(box), max(size, thumb))
        images.save_jpeg(out / f"{index:05d}.jpg", augment.crop_to_box(rgb, local, margin, size), quality)
        return index, (*box, method), review.jpeg_bytes(augment.crop_to_box(rgb, local, margin, thumb)), None
    except images.BadImage as e:
        return index, None, None, str(e)


def catalogue(run: Run) -> tuple[pd.DataFrame, np.ndarray]:
    """(File, Image, Id, path under WORK; their vectors) of the trained catalogue and the accepted photos."""
    tables, vectors = [], []
    for stage in ("gallery", "gallery_added"):
        table = run.read_csv(stage, "gallery.csv")
        v = np.load(run.upstream(stage, "vectors.npy"))
        if len(table):
            tables.append(table)
            vectors.append(v)
    return pd.concat(tables, ignore_index=True), np.concatenate(vectors)


def best_photos(embedder, Q: np.ndarray, G: np.ndarray, gallery_ids: np.ndarray, candidates: list[list[str]]):
    """For each query and candidate id: the row of that id's gallery photo most similar to the query."""
    rows_of = pd.Series(np.arange(len(gallery_ids))).groupby(gallery_ids).apply(np.asarray).to_dict()
    out = []
    for s in range(0, len(Q), 256):
        S = embedder.similarity(Q[s:s + 256], G)
        for i, ids in enumerate(candidates[s:s + 256]):
            out.append([int(rows_of[c][np.argmax(S[i, rows_of[c]])]) if c in rows_of else -1 for c in ids])
    return out


def batch_run(run: Run, photos: Path) -> dict:
    if not photos.is_dir():
        raise StageError(f"--photos {photos}: no such folder")
    files = list_photos(photos)
    if not files:
        raise StageError(f"--photos {photos}: the folder holds no files")
    size, top = run.setting("run.image_size"), run.setting("identify.top")
    crops = run.path("crops")
    crops.mkdir(exist_ok=True)
    mode = run.setting("identify.boxes")
    if mode == "auto":
        mode = "whole" if run.setting("boxes.import_csv") else "detect"
        run.echo("new photos are cropped " + ("whole, as the catalogue's boxes were imported (boxes.import_csv)"
                                              if mode == "whole" else f"to detected boxes (boxes.detector = "
                                              f"{run.setting('boxes.detector')}), as the catalogue's were"))
    detect = {k.split(".")[1]: run.setting(k) for k in DETECT_SETTINGS} if mode == "detect" else None
    work = partial(_crop_photo, detect=detect,
                   margin=run.setting("augment.margin"), size=size, thumb=review.THUMB,
                   quality=run.setting("augment.jpeg_quality"), out=crops)
    rows, thumbs = [], {}
    for index, box, thumb, error in run.map(work, [(i, rel, p) for i, (rel, p) in enumerate(files)], "boxes + crops",
                                            chunksize=4):
        rel, path = files[index]
        if error:
            run.skip(rel, error)
            continue
        rows.append((rel, path, f"crops/{index:05d}.jpg", *box))
        thumbs[rel] = thumb
    table = pd.DataFrame(rows, columns=["photo", "source", "crop", "x0", "y0", "x1", "y1", "method"])
    run.write_csv("photos.csv", table)
    if run.skipped:
        run.echo(f"{len(run.skipped)} of {len(files)} files are not usable photos (listed in {run.path('skipped.csv')})")
    gallery, G = catalogue(run)
    net = models.load_model(run.upstream("train", "model.keras"))
    scorer_model, classes = scoring.scorer(run, net, gallery[["File", "Image", "Id"]], embedded=G)
    jobs = [(r.photo, str(run.dir / r.crop), None) for r in table.itertuples()]
    merge, rankings, reranking = run.setting("predict.merge"), {}, local.enabled(run.setting)
    depth = max(top, run.setting("rerank.candidates")) if reranking else top
    never = train_only_ids(run)
    drop = np.array([c in never for c in classes]) if never else None
    for photo, probs, error in scoring.class_scores(run, scorer_model, jobs, run.setting("predict.batch_size"),
                                                    "TTA + model"):
        if error:
            run.skip(photo, error)
        else:
            if drop is not None:  # scored under any answer, as predict does
                probs = np.where(drop, -1.0, probs)
            rankings[photo] = submission.ranked(probs, classes, merge, depth)
    table = table[table.photo.isin(rankings)].reset_index(drop=True)
    drawn, note = {}, ""
    if reranking:
        rankings, reranker = local.reranked(run, rankings, table, gallery, top)
        drawn, note = local.pairs(run, reranker, table, rankings)
    share = run.setting("new_whale.share")
    thr = (submission.share_threshold([s[0] for _, s in rankings.values()], share) if share > 0 and rankings
           else scoring.threshold(run))
    embedder = scoring.Embedder(net)
    Q = _embed(run, net, [str(run.dir / c) for c in table.crop], "batch")
    _save_vectors(run, "vectors.npy", Q)
    cands = [rankings[p][0] for p in table.photo]
    best = best_photos(embedder, Q, G, gallery.Id.to_numpy(), cands) if len(table) else []
    calib = (review.Calibration(why="scores fused with local features (rerank.method = local): evaluate's "
                                    "validation precision is for the embedding's scores, so none is shown")
             if reranking else review.calibration(run.work, scoring.model_digest(run)))
    matches = []
    for i, photo in enumerate(table.photo):
        labels, scores = rankings[photo]
        new = bool(scores[0] < thr)
        for rank, (c, s) in enumerate(zip(labels, scores), start=1):
            g = best[i][rank - 1]
            matches.append((photo, rank, c, round(float(s), 4), calib.precision(s), int(new),
                            gallery.path[g] if g >= 0 else ""))
    matches = pd.DataFrame(matches, columns=["photo", "rank", "id", "score", "precision", "new_individual",
                                             "catalogue_photo"])
    run.write_csv("matches.csv", matches)
    ids = {i[: -len(augment.FLIP)] if i.endswith(augment.FLIP) else i for i in gallery.Id}
    review.write(run.path("review.html"), run.stage.name.split("/", 1)[1], matches, thumbs, run.work, thr, calib,
                 run.skipped, drawn, note, sorted(ids))
    flagged = int(matches.drop_duplicates("photo").new_individual.sum()) if len(matches) else 0
    run.echo(f"{len(table)} photos ranked against {gallery.Id.nunique()} ids ({len(gallery)} catalogue files); "
             f"threshold {thr:.3f}: {flagged} look like new individuals")
    return {"photos": len(table), "files": len(files), "new_individuals": flagged, "threshold": round(float(thr), 4)}


def stages(batch: str | None = None, photos: Path | None = None) -> list[Stage]:
    """identify's stages, after every pipeline stage (the session's list, for upstream lookups)."""
    return [GALLERY, GALLERY_ADDED] + ([batch_stage(batch, photos)] if batch else [])


class CatalogueSession(Session):
    """identify takes the trained pipeline as it is: a pipeline stage counts as done while its
    artifacts match its manifest, whatever became of its inputs (a data folder moved away, a setting
    changed since training: identify neither reads nor rebuilds them). identify's own stages are
    checked in full, so a retrained model or a changed setting recomputes the gallery."""

    own: tuple[str, ...] = ()

    def status(self, stage: Stage, _seen: dict | None = None) -> Status:
        if stage.name in self.own:
            return super().status(stage, _seen)
        m = self.manifest(stage.name)
        if m is None:
            return Status("missing", "never run")
        for name, digest in m["artifacts"].items():
            if not self.matches(digest, self.dir(stage.name) / name):
                return Status("modified", f"artifact {self.dir(stage.name) / name} was modified after its run", m)
        return Status("done", "", m)


def command(work: Path, photos: Path, batch: str | None, top: int | None, overrides=(), workers: int = 1,
            quiet: bool = False, echo=print) -> Path:
    """Run identify's stages for one batch (those not up to date) with the settings WORK was run with;
    returns the batch's folder. No data folder is read, so none is needed."""
    from ..pipeline.stages import ALL
    from ..pipeline.workfolder import is_dir_or_error, open_work
    work = Path(work)
    is_dir_or_error(work)
    batch = batch_name(batch or Path(photos).resolve().name)
    sets = tuple(overrides) + ((f"identify.top={top}",) if top else ())
    targets = stages(batch, photos)
    opened = open_work(work, None, None, sets, workers, quiet, ALL + targets, echo=echo).session
    session = CatalogueSession(**{f.name: getattr(opened, f.name) for f in fields(Session)})
    session.own, session.data = tuple(s.name for s in targets), None  # no data folder is read
    trained = session.status(session.stage("train"))
    if not trained.done:
        raise StageError(f"{work} has no trained model ({session.dir('train')}: {trained.state}, {trained.reason}): "
                         f"run whaleid train --work {work} first")
    with work_lock(work, "identify"):
        try:
            session.run(targets)
        finally:
            session.close()
    return session.dir(targets[-1].name)
