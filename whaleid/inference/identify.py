"""identify: a batch of new photos against the catalogue the model was trained on, for the photo-ID
researcher's daily loop (issue 24): rank, review (review.py), accept (accept.py), repeat.

    whaleid identify --work WORK --photos DIR [--batch NAME] [--top 5]

Three stages of the ordinary stage cache (pipeline/stage.py), declared with every other stage in
whaleid/stages.py, so a changed model or setting recomputes exactly
what depends on it and a second batch recomputes nothing it shares with the first:
  gallery            the catalogue's vectors: every photo of a known id in augment's files (what
                     predict compares test photos with), embedded once. Upstream: augment, train.
  gallery_added      the vectors of the photos `identify --accept` added since (WORK/catalogue/), so
                     a confirmed photo is a candidate in the next batch without retraining.
  identify/<batch>   WORK/identify/<batch>/: every file under DIR (nested folders, any name; files
                     that are not readable photos are skipped and listed in skipped.csv) gets a tail
                     box (identify.boxes: detected as the catalogue's were, or the whole photo when
                     the catalogue's boxes were imported), a crop, TTA scores against the catalogue
                     (inference/ranking.py, the ranking path predict and evaluate take; rerank.method
                     = local re-ranks as predict does), the new_whale threshold predict would use,
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

from whaleid.data import images
from whaleid.data.tables import read_sides, read_train_only, side_name
from whaleid.inference import identify_local, ranking, review
from whaleid.inference.accept import added_files
from whaleid.inference.embedding import Embedder
from whaleid.learning import model as models
from whaleid.pipeline.files import StageError, work_lock, write_bytes
from whaleid.pipeline.stage import Run, Session, Stage, Status
from whaleid.preprocess import augment, boxes
from whaleid.similarity import gallery_cache
from whaleid.similarity.gallery import gallery_files
from whaleid.similarity.threshold import choose_threshold, model_digest
from whaleid.stages import CATALOGUE, DETECT_SETTINGS, identify_stages, train_only_file


def _save_vectors(run: Run, name: str, vectors: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vectors, np.float32))
    write_bytes(run.path(name), buf.getvalue())


def _embed(run: Run, net, paths: list[str], what: str) -> np.ndarray:
    if not paths:
        return np.zeros((0, 0), np.float32)
    return Embedder(net).encode_files(paths, run.setting("run.image_size"), run.setting("predict.batch_size"),
                                      run.session.progress, f"[{run.stage.name}] embed {what}")


def gallery_run(run: Run) -> dict:
    files = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
    gallery = gallery_files(files, None, run.setting("predict.gallery_tta"), run.setting("train.flip_ids"))
    if gallery.empty:
        raise StageError("the catalogue is empty: augment's files hold no photo of a known id")
    folder = run.upstream("augment", "images")
    net = models.load_model(run.upstream("train", "model.keras"))
    # shared with evaluate and predict (similarity/gallery_cache.py): what they embedded is not embedded again
    vectors = gallery_cache.vectors(run, list(gallery.File),
                                    lambda files: _embed(run, net, [str(folder / f) for f in files], "catalogue"))
    run.write_csv("gallery.csv", gallery.assign(path=[f"augment/images/{f}" for f in gallery.File]))
    _save_vectors(run, "vectors.npy", vectors)
    run.echo(f"catalogue: {len(gallery)} files of {gallery.Image.nunique()} photos, {gallery.Id.nunique()} ids")
    return {"files": len(gallery), "photos": int(gallery.Image.nunique()), "ids": int(gallery.Id.nunique())}


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


def batch_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}", name or ""):
        raise StageError(f"batch name {name!r}: use letters, digits, '.', '_' and '-' (e.g. --batch 2026-12-03)")
    return name


BATCH_ENCOUNTERS = "encounters.csv"  # DIR/encounters.csv: photo, Encounter (the batch says which were taken with which)
BATCH_SIDES = "sides.csv"            # DIR/sides.csv: photo, Side (left | right | unknown)


def list_photos(folder: Path) -> list[tuple[str, str]]:
    """(name relative to folder, path) of every file under it, nested folders included, hidden ones and
    the batch's own encounters.csv and sides.csv not."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in (BATCH_ENCOUNTERS, BATCH_SIDES):
            out.append((rel.as_posix(), str(p.resolve())))
    return out


def encounters(inputs: dict[str, Path], batch: list[str]) -> dict | None:
    """photo -> encounter for the ranking path, or None: a batch is one new encounter per photo (nothing
    in the catalogue to set aside) unless DIR/encounters.csv (photo, Encounter) puts its photos in
    encounters the catalogue's photos belong to (split.csv's Encounter, from the data folder's table).
    `inputs`: the stage's input files (stages.py declares split.csv when the batch has its table)."""
    path = Path(inputs["file/photos"]) / BATCH_ENCOUNTERS
    split_csv = inputs.get("file/split.csv")
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"photo", "Encounter"} <= set(table.columns):
        raise StageError(f"{path}: expected columns photo, Encounter (a photo as identify names it: its path under "
                         f"--photos)")
    known = pd.read_csv(split_csv, dtype=str, keep_default_na=False) if split_csv else pd.DataFrame()
    out = dict(zip(known.Image, known.Encounter)) if "Encounter" in known.columns else {}
    given = dict(zip(table.photo, table.Encounter))
    out.update({p: given.get(p, f"{BATCH_ENCOUNTERS}:{p}") for p in batch})
    return out


def sides(inputs: dict[str, Path], batch: list[str]) -> dict | None:
    """photo -> left | right for the batch (DIR/sides.csv: photo, Side) and the catalogue (its data
    folder's sides.csv), or None when the batch does not say: every batch photo meets every side."""
    path = Path(inputs["file/photos"]) / BATCH_SIDES
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"photo", "Side"} <= set(table.columns):
        raise StageError(f"{path}: expected columns photo, Side (left, right or unknown)")
    bad = [i for i, v in enumerate(table.Side) if side_name(v) is None]
    if bad:
        raise StageError(f"{path}, row {bad[0] + 2}: side {table.Side[bad[0]]!r}; write left, right or unknown")
    out = read_sides(None, inputs["file/sides.csv"]) if "file/sides.csv" in inputs else {}
    given = {p: side_name(s) for p, s in zip(table.photo, table.Side)}
    out.update({p: given.get(p, "unknown") for p in batch})
    return out


def train_only_ids(run: Run) -> set[str]:
    path = train_only_file(run.work)
    if path is None:
        recorded = ((run.session.manifest("split") or {}).get("inputs") or {}).get("data/train_only.csv")
        if recorded:
            run.echo("WARNING: the model was trained with a train_only.csv, and the data folder that holds it is not "
                     "where WORK remembers it: its train-only individuals may be named as candidates")
        return set()
    return read_train_only(path)


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


def crop_batch(run: Run, photos: Path) -> tuple[pd.DataFrame, dict[str, bytes], int]:
    """(photos.csv's table, {photo: thumbnail JPEG}, files seen): every file under `photos` boxed as the
    catalogue's photos were (or whole) and cropped at the model's size into the batch's crops/."""
    if not photos.is_dir():
        raise StageError(f"--photos {photos}: no such folder")
    files = list_photos(photos)
    if not files:
        raise StageError(f"--photos {photos}: the folder holds no files")
    crops = run.path("crops")
    crops.mkdir(exist_ok=True)
    mode = run.setting("identify.boxes")
    if mode == "auto":
        mode = "whole" if run.setting("boxes.import_csv") else "detect"
        run.echo("new photos are cropped " + ("whole, as the catalogue's boxes were imported (boxes.import_csv)"
                                              if mode == "whole" else f"to detected boxes (boxes.detector = "
                                              f"{run.setting('boxes.detector')}), as the catalogue's were"))
    detect = {k.split(".")[1]: run.setting(k) for k in DETECT_SETTINGS} if mode == "detect" else None
    work = partial(_crop_photo, detect=detect, margin=run.setting("augment.margin"), size=run.setting("run.image_size"),
                   thumb=review.THUMB, quality=run.setting("augment.jpeg_quality"), out=crops)
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
    return table, thumbs, len(files)


def batch_run(run: Run) -> dict:
    inputs = run.session.input_paths(run.stage, need_data=False)
    table, thumbs, n_files = crop_batch(run, Path(inputs["file/photos"]))
    gallery, G = catalogue(run)
    net = models.load_model(run.upstream("train", "model.keras"))
    signals = ranking.signals(run, gallery, extra_store=lambda: identify_local.batch_features(run, table),
                              prefix=identify_local.PREFIX)  # re-ranking: the batch's own local features too
    together = encounters(inputs, list(table.photo))
    same = ranking.photo_rule(run, together, sides(inputs, list(table.photo)))
    ranker = ranking.Ranker(run, net, gallery[["File", "Image", "Id"]], run.setting("identify.top"), vectors=G,
                            never=train_only_ids(run), signals=signals, encounters=same)
    ranked = {}
    for r in ranker.rank([(r.photo, str(run.dir / r.crop), None) for r in table.itertuples()]):
        if r.error:
            run.skip(r.image, r.error)
        else:
            ranked[r.image] = r.ranking
    table = table[table.photo.isin(ranked)].reset_index(drop=True)
    matcher = getattr(signals[0], "reranker", None) if signals else None
    drawn, note = identify_local.pairs(run, matcher, table, ranked) if matcher else ({}, "")
    thr = choose_threshold(run, [s[0] for _, s in ranked.values()])
    Q = _embed(run, net, [str(run.dir / c) for c in table.crop], "batch")
    _save_vectors(run, "vectors.npy", Q)
    # (photos, catalogue rows): of the photo's own encounter, or of its other side
    aside = same.same(list(table.photo), same.codes(gallery.Image)) if same else None
    best = ranking.best_photos(Embedder(net).similarity, Q, G, gallery.Id.to_numpy(), [ranked[p][0] for p in table.photo],
                               aside) if len(table) else []
    calib = (review.Calibration(why="scores fused with local features (rerank.method = local): evaluate's "
                                    "validation precision is for the embedding's scores, so none is shown")
             if signals else review.calibration(run.work, model_digest(run)))
    matches = pd.DataFrame([(photo, rank, c, round(float(s), 4), calib.precision(s), int(ranked[photo][1][0] < thr),
                             gallery.path[g] if (g := best[i][rank - 1]) >= 0 else "")
                            for i, photo in enumerate(table.photo)
                            for rank, (c, s) in enumerate(zip(*ranked[photo]), start=1)],
                           columns=["photo", "rank", "id", "score", "precision", "new_individual", "catalogue_photo"])
    run.write_csv("matches.csv", matches)
    ids = {i[: -len(augment.FLIP)] if i.endswith(augment.FLIP) else i for i in gallery.Id}
    set_aside = int(aside[:, ~gallery.Image.duplicated().to_numpy()].sum()) if aside is not None else 0
    review.write(run.path("review.html"), run.stage.name.split("/", 1)[1], matches, thumbs, run.work, thr, calib,
                 run.skipped, drawn, note, sorted(ids), encounter_note(together is not None, same is not None and bool(same.sides), set_aside))
    flagged = int(matches.drop_duplicates("photo").new_individual.sum()) if len(matches) else 0
    run.echo(f"{len(table)} photos ranked against {gallery.Id.nunique()} ids ({len(gallery)} catalogue files); "
             f"threshold {thr:.3f}: {flagged} look like new individuals")
    return {"photos": len(table), "files": n_files, "new_individuals": flagged, "threshold": round(float(thr), 4)}


def encounter_note(encounters: bool, sides: bool, set_aside: int) -> str:
    """The review page's line on encounters and sides: how many (photo, catalogue photo) pairs were set aside."""
    if not encounters and not sides:
        return "Each photo of this batch is its own new encounter: no catalogue photo was set aside"
    why = " or ".join(([f"as the same encounter as a photo of this batch ({BATCH_ENCOUNTERS}): a match with them "
                        f"would prove nothing"] if encounters else [])
                      + ([f"as the other side of the animal than the batch photo ({BATCH_SIDES})"] if sides else []))
    return f"{set_aside} catalogue photo(s) were set aside {why}"


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
    from whaleid.pipeline.workfolder import is_dir_or_error, open_work
    work = Path(work)
    is_dir_or_error(work)
    batch = batch_name(batch or Path(photos).resolve().name)
    sets = tuple(overrides) + ((f"identify.top={top}",) if top else ())
    every, targets = identify_stages(batch, Path(photos).resolve())
    opened = open_work(work, None, None, sets, workers, quiet, every, echo=echo).session
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
