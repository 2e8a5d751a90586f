"""The embedding step of the ranking path (inference/ranking.py): test-time versions of each photo and
a score per known id for each version, as the trained model's head scores them.

Each photo is cropped to its box and resized once, then 4 versions are made (augment.TTA):
original, left-right flip, a random 1..crop_max px crop resized back, and that crop flipped and
blurred (deterministic per photo for the seed). All versions of a batch go through the model in one
forward pass; photo decoding runs in --workers processes ahead of the model.

Heads that rank by retrieval embed the gallery (known ids' photos) once (similarity/gallery_cache.py
keeps the vectors between runs); a version's score for an id is its best gallery photo's similarity
(similarity/gallery.py). From there TTA merge, new_whale threshold and answers are the same for
every head.
"""
from __future__ import annotations

import json
from functools import partial

import cv2
import numpy as np
import pandas as pd

from whaleid.data import images
from whaleid.learning import heads, inputs
from whaleid.pipeline.stage import Run, StageError
from whaleid.preprocess import augment
from whaleid.similarity import gallery_cache
from whaleid.similarity.gallery import GalleryScorer


def tta_versions(base: np.ndarray, rng: np.random.Generator, crop_max: int, sigma_max: float,
                 tta: bool = True) -> np.ndarray:
    """(4, S, S, 3) uint8 (or (1, ...) without TTA)."""
    if not tta:
        return base[None]
    return np.stack(augment.variants(base, rng, crop_max, sigma_max, augment.TTA))


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


def class_scores(run: Run, model, jobs: list, batch_size: int, desc: str, on_batch=None):
    """Yield (image, scores (versions, classes) or None, error) in job order; versions of a whole batch
    go through the model in one call (the last batch padded to the first one's size). `on_batch(rows)`
    hears the photo of each row before the call (the ranking path's same-encounter rule)."""
    work = partial(prepare, size=run.setting("run.image_size"), margin=run.setting("augment.margin"),
                   crop_max=run.setting("augment.crop_max"), sigma_max=run.setting("augment.blur_sigma_max"),
                   seed=run.setting("run.seed"), tta=run.setting("predict.tta"))
    pending, rows = [], None

    def flush():
        nonlocal rows
        stack = np.concatenate([v for _, v in pending]).astype(np.float32)
        rows = rows or len(stack)
        if on_batch is not None:
            on_batch([image for image, v in pending for _ in range(len(v))])
        out = np.asarray(model.predict_on_batch(inputs.padded(stack, rows)), dtype=np.float32)
        i = 0
        for image, v in pending:
            yield image, out[i:i + len(v)], None
            i += len(v)
        pending.clear()

    for image, versions, error in run.map(work, jobs, desc, chunksize=8):
        if error:
            yield image, None, error
            continue
        pending.append((image, versions))
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def gallery_scorer(model):
    """The GalleryScorer inside a scorer's wrappers (FixedBatch, MirrorFold, arcface's CentreMix), or
    None for a head that scores its own classes (softmax)."""
    while model is not None and not isinstance(model, GalleryScorer):
        model = getattr(model, "retrieval", None) or getattr(model, "model", None)
    return model


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


class Embedder:
    """A trained model as retrieval needs it: its head (recorded in the model), images -> vectors,
    and the head's similarity between vectors. Works on a model being trained too."""

    def __init__(self, net):
        self.net, self.head = net, heads.from_model(net)
        self.encoder = self.head.encoder(net)

    def encode(self, images_: np.ndarray) -> np.ndarray:
        return np.asarray(self.encoder.predict_on_batch(np.asarray(images_, np.float32)), np.float32)

    def encode_files(self, paths: list[str], image_size: int, batch_size: int, progress: bool = True,
                     desc: str = "embed") -> np.ndarray:
        return inputs.encode_files(self.encode, paths, image_size, batch_size, progress, desc)

    def similarity(self, Q: np.ndarray, G: np.ndarray) -> np.ndarray:
        return self.head.similarity(self.net, Q, G)

    def pair_similarity(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        return self.head.pair_similarity(self.net, A, B)


class MirrorFold:
    """A model trained with train.flip_ids scores <id> and <id>_flip. For a mirrored TTA version the
    two swap roles (the mirror of a photo of <id> looks like <id>_flip's photos); then <id>_flip
    leaves the ranking, or, when mirror images show the same animal (predict.mirror_is_same),
    counts for <id> too (the better of the two)."""

    def __init__(self, model, classes: list[str], mirrored_versions: tuple[bool, ...], same: bool):
        self.model, self.same = model, same
        self.mirrored = np.array(mirrored_versions)
        index = {c: i for i, c in enumerate(classes)}
        self.classes = [c for c in classes if not c.endswith(augment.FLIP)]
        self.plain = np.array([index[c] for c in self.classes])
        self.flip = np.array([index.get(c + augment.FLIP, index[c]) for c in self.classes])

    def predict_on_batch(self, images):
        scores = np.asarray(self.model.predict_on_batch(images), np.float32)
        mirror = np.resize(self.mirrored, len(scores))[:, None]  # rows: each photo's versions in turn
        plain, flip = scores[:, self.plain], scores[:, self.flip]
        own, other = np.where(mirror, flip, plain), np.where(mirror, plain, flip)
        return np.maximum(own, other) if self.same else own


def scorer(run: Run, net, gallery: pd.DataFrame, embedded: np.ndarray | None = None):
    """(model-like object with predict_on_batch -> a score per id, ids), as the model's head scores:
    its own classes (softmax), or by retrieval over `gallery` (File, Id in augment/images; `embedded`:
    the gallery already embedded, e.g. identify's cached catalogue)."""
    embedder = Embedder(net)
    classes = json.loads(run.upstream("train", "classes.json").read_text())

    def embedded_gallery():
        if gallery.empty:
            raise StageError("no photos of known ids to compare test photos with (the gallery is empty)")
        if embedded is not None:
            return embedded, gallery.Id
        folder = run.upstream("augment", "images")
        vectors = gallery_cache.vectors(run, list(gallery.File), lambda files: embedder.encode_files(
            [str(folder / f) for f in files], run.setting("run.image_size"), run.setting("predict.batch_size"),
            run.session.progress, f"[{run.stage.name}] embed gallery"))
        run.echo(f"gallery: {len(gallery)} files of {gallery.Image.nunique()} photos, {gallery.Id.nunique()} ids")
        return vectors, gallery.Id

    model, ids = embedder.head.scorer(net, embedder.encode, classes, embedded_gallery)
    if run.setting("train.flip_ids"):
        versions = augment.mirrored(augment.TTA) if run.setting("predict.tta") else (False,)
        model = MirrorFold(model, list(ids), versions, run.setting("predict.mirror_is_same"))
        return model, model.classes
    return model, ids
