"""predict: test-time augmentation, top-5 with a new_whale threshold -> submission.csv (design.md §7).

Inputs:    format/test.csv, boxes/BB_TEST.csv, dedup/known_answers.csv, train/model.keras +
           classes.json, the data folder's sample_submission.csv and test/, and
           WORK/tuned_threshold.json when `whaleid evaluate --tune-threshold` wrote one (for this
           head and model); embedding heads: augment/TRAINING_FILE_FINAL.csv + images/ (the gallery)
Artifacts: submission.csv    Image,Id: one row per sample_submission image, in its order, 5 distinct labels
           predictions.csv   per image: the answer, its source (model / known / fallback), top score
           (WORK/submission.csv is a copy, where users look for it)

Each test photo is cropped to its box and resized once, then 4 versions are made: original,
left-right flip, a random 1..crop_max px crop resized back, and that crop flipped and blurred
(deterministic per photo for the seed). All versions of a batch go through the model in one forward
pass; photo decoding runs in --workers processes ahead of the model.

Embedding heads (siamese, triplet) rank ids instead of classifying: the gallery, every photo of a
known id (augment's crops: the original, or every offline variant with predict.gallery_tta), is
embedded once; each test version's score for an id is its best gallery photo's similarity
(retrieval.py), and from there TTA merge, new_whale threshold and file are the softmax path's. The
gallery holds all known ids, also those split held out of training: a new id needs photos, not a
retrained model.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from . import augment, images, submission
from .stage import Run, StageError, atomic_path
from .stages import TUNED
from .tables import NEW_WHALE, read_test

TTA_VERSIONS = ("original", "flip", "crop", "crop-flip-blur")


def tta_versions(base: np.ndarray, rng: np.random.Generator, crop_max: int, sigma_max: float,
                 tta: bool = True) -> np.ndarray:
    """(4, S, S, 3) uint8 (or (1, ...) without TTA)."""
    if not tta:
        return base[None]
    crop = augment.random_crop(base, rng, crop_max)
    sigma = rng.uniform(0, sigma_max)
    flipped = crop[:, ::-1]
    blurred = cv2.GaussianBlur(flipped, (0, 0), sigma) if sigma > 0.05 else flipped
    return np.stack([base, base[:, ::-1], crop, blurred])


def prepare(job, size: int, margin: float, crop_max: int, sigma_max: float, seed: int, tta: bool):
    """Worker: (image, versions or None, error) for one photo; `box` None means the photo is already a crop."""
    image, path, box = job
    try:
        if box is None:
            base = np.asarray(images.to_rgb(images.open_image(path)))
            if base.shape[:2] != (size, size):
                base = cv2.resize(base, (size, size), interpolation=cv2.INTER_AREA)
        else:
            rgb, local = augment.decode_for_crop(path, box, size)
            base = augment.crop_to_box(rgb, local, margin, size)
    except images.BadImage as e:
        return image, None, str(e)
    return image, tta_versions(base, augment.photo_rng(seed + 1, image), crop_max, sigma_max, tta), None


def class_probabilities(run: Run, model, jobs: list, batch_size: int, desc: str):
    """Yield (image, probs (versions, classes) or None, error) in job order; versions of a whole batch
    go through the model in one call."""
    work = partial(prepare, size=run.setting("run.image_size"), margin=run.setting("augment.margin"),
                   crop_max=run.setting("augment.crop_max"), sigma_max=run.setting("augment.blur_sigma_max"),
                   seed=run.setting("run.seed"), tta=run.setting("predict.tta"))
    pending = []

    rows = None

    def flush():
        nonlocal rows
        stack = np.concatenate([v for _, v, _ in pending]).astype(np.float32)
        rows = rows or len(stack)  # the first (full) batch's size: a short last batch is padded to it,
        if len(stack) < rows:      # so the model is traced once
            stack = np.concatenate([stack, np.zeros((rows - len(stack),) + stack.shape[1:], np.float32)])
        out = np.asarray(model.predict_on_batch(stack), dtype=np.float32)
        i = 0
        for image, v, _ in pending:
            yield image, out[i:i + len(v)], None
            i += len(v)
        pending.clear()

    for image, versions, error in run.map(work, jobs, desc, chunksize=8):
        if error:
            yield image, None, error
            continue
        pending.append((image, versions, None))
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def model_digest(run: Run) -> str | None:
    """The sha256 of the trained model, as train's manifest records it."""
    m = run.session.manifest("train") or {}
    return m.get("artifacts", {}).get("model.keras")


def threshold(run: Run) -> float:
    """The tuned threshold when evaluate tuned it for this head and model, else new_whale.threshold: a
    threshold on softmax probabilities means nothing for embedding similarities, and vice versa."""
    tuned = run.work / TUNED
    configured = run.setting("new_whale.threshold")
    if tuned.exists():
        info = json.loads(tuned.read_text())
        value = float(info["threshold"])
        head, model = info.get("head"), info.get("model")
        if head not in (None, run.setting("model.head")) or model not in (None, model_digest(run)):
            what = f"the {head} head" if head != run.setting("model.head") else "another trained model"
            run.echo(f"{tuned} was tuned for {what}: ignoring it, using new_whale.threshold = {configured} "
                     f"(run whaleid evaluate --tune-threshold again)")
            return configured
        run.echo(f"using the tuned new_whale threshold {value:.3f} from {tuned} "
                 f"(delete it to use new_whale.threshold = {configured})")
        return value
    return configured


def gallery_files(files: pd.DataFrame, photos, all_variants: bool) -> pd.DataFrame:
    """File, Image, Id of the gallery: augment's files (TRAINING_FILE_FINAL) of `photos` (None: every
    photo of a known id); the original only (each photo's first file) unless all_variants."""
    g = files[files.Id != NEW_WHALE]
    if photos is not None:
        g = g[g.Image.isin(set(photos))]
    if not all_variants:
        g = g.drop_duplicates("Image")
    return g[["File", "Image", "Id"]].reset_index(drop=True)


def scorer(run: Run, net, gallery: pd.DataFrame | None):
    """(model-like object with predict_on_batch, classes): the softmax model and its class list, or
    for an embedding head a GalleryScorer over `gallery` (File, Id; files in augment/images)."""
    from .embedding import Embedder
    from .retrieval import GalleryScorer
    head = run.setting("model.head")
    try:
        embedder = Embedder(net, head)
    except ValueError as e:
        raise StageError(f"{run.upstream('train', 'model.keras')}: {e}; rerun with --force train") from None
    if head == "softmax":
        return net, json.loads(run.upstream("train", "classes.json").read_text())
    if gallery is None or gallery.empty:
        raise StageError("no photos of known ids to compare test photos with (the gallery is empty)")
    folder = run.upstream("augment", "images")
    vectors = embedder.encode_files([str(folder / f) for f in gallery.File], run.setting("run.image_size"),
                                    run.setting("predict.batch_size"), run.session.progress,
                                    f"[{run.stage.name}] embed gallery")
    s = GalleryScorer(embedder.encode, embedder.similarity, vectors, gallery.Id)
    run.echo(f"gallery: {len(gallery)} files of {gallery.Image.nunique()} photos, {len(s.classes)} ids")
    return s, s.classes


def photo_jobs(test: pd.DataFrame, boxes: pd.DataFrame, folder: Path) -> list[tuple]:
    """(image, path, box) for prepare(), for the photos of `test` that have a box (boxes: by Image)."""
    usable = test[test.Image.isin(boxes.index)]
    return [(r.Image, str(folder / r.Image), tuple(int(v) for v in boxes.loc[r.Image, ["x0", "y0", "x1", "y1"]]))
            for r in usable.itertuples()]


def run(run: Run) -> dict:
    from . import model as models
    order, _ = read_test(run.data / "sample_submission.csv")
    test = run.read_csv("format", "test.csv")
    boxes = run.read_csv("boxes", "BB_TEST.csv").set_index("Image")
    known = dict(run.read_csv("dedup", "known_answers.csv")[["Image", "Id"]].itertuples(index=False))
    net = models.load_model(run.upstream("train", "model.keras"))
    gallery = None
    if run.setting("model.head") != "softmax":
        gallery = gallery_files(run.read_csv("augment", "TRAINING_FILE_FINAL.csv"), None,
                                run.setting("predict.gallery_tta"))
    model, classes = scorer(run, net, gallery)
    thr, merge, k = threshold(run), run.setting("predict.merge"), run.setting("predict.top_k")
    jobs = photo_jobs(test, boxes, run.data / "test")
    answers, rows = {}, []
    for image, probs, error in class_probabilities(run, model, jobs, run.setting("predict.batch_size"), "TTA + model"):
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
