"""arcface (Deng et al. 2019; what won the whale competitions): an L2-normalised embedding, cosine
logits against normalised weight vectors, one per id or K per id (sub-center ArcFace: the id's
logit is its best centre's, so a few atypical photos of an id get a centre of their own), trained
with cross-entropy on s * cos(theta + m) for the true id and s * cos(theta) for the others.

model.arcface_margin m and model.arcface_scale s follow the literature (0.5 and 30-65; pudae's 3rd
place used s = 65, m = 0.5). With model.arcface_dynamic_margin the margin of each id grows as its
photo count falls (Happywhale 2022 winners): m_i = m_min + (m - m_min) * (n_i^-1/4 - n_max^-1/4) /
(n_min^-1/4 - n_max^-1/4), m_min = m / 2, so rare ids get m and the most common m / 2.

Predicted by retrieval like the other embedding heads: each id's best gallery photo by cosine
similarity ((1 + cos) / 2 in [0, 1]), optionally mixed with the cosine to the id's centre
(model.arcface_centre_weight: w * centre + (1 - w) * gallery, for ids the model was trained on).
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from whaleid.similarity.gallery import GalleryScorer
from whaleid.learning.heads.base import CosineHead, L2Normalize, labels_of


@keras.saving.register_keras_serializable(package="whaleid")
class CosineCentres(keras.layers.Layer):
    """(B, d) unit embeddings -> (B, n_classes) cosines to each id's nearest of its K unit centres."""

    def __init__(self, n_classes: int, subcenters: int = 1, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.n_classes, self.subcenters = int(n_classes), int(subcenters)

    def build(self, input_shape):
        self.centres = self.add_weight(shape=(int(input_shape[-1]), self.n_classes * self.subcenters),
                                       initializer="glorot_uniform", name="centres")

    def unit_centres(self):
        w = ops.cast(self.centres, "float32")
        return w / ops.sqrt(ops.maximum(ops.sum(w * w, axis=0, keepdims=True), 1e-12))

    def call(self, x):
        cos = ops.matmul(ops.cast(x, "float32"), self.unit_centres())
        cos = ops.reshape(cos, (-1, self.n_classes, self.subcenters))
        return ops.max(cos, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes, "subcenters": self.subcenters}


def arcface_logits(cos, labels, margins, scale: float):
    """s * cos(theta + m_y) for the true class, s * cos(theta) for the others. Where theta + m would
    pass pi (cos(theta + m) no longer falls with theta), the CosFace-style cos - m * sin(m) keeps
    the logit monotonic (as in insightface's easy_margin = False)."""
    cos = ops.clip(ops.cast(cos, "float32"), -1.0 + 1e-7, 1.0 - 1e-7)
    m = ops.take(ops.cast(margins, "float32"), labels)[:, None]
    sin = ops.sqrt(1.0 - cos * cos)
    with_margin = cos * ops.cos(m) - sin * ops.sin(m)
    with_margin = ops.where(cos > ops.cos(np.pi - m), with_margin, cos - m * ops.sin(m))
    onehot = ops.one_hot(labels, ops.shape(cos)[-1], dtype="float32")
    return scale * (onehot * with_margin + (1.0 - onehot) * cos)


class ArcFaceLoss(keras.losses.Loss):
    def __init__(self, margins, scale: float, name: str = "loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.margins, self.scale = np.asarray(margins, np.float32), float(scale)

    def call(self, y_true, y_pred):
        labels, _ = labels_of(y_true)
        logits = arcface_logits(y_pred, labels, self.margins, self.scale)
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def id_margins(counts, margin: float, dynamic: bool) -> np.ndarray:
    """Per-id margin: m for every id, or growing as the id's photo count falls (module docstring)."""
    counts = np.maximum(np.asarray(counts, np.float64), 1)
    if not dynamic or counts.min() == counts.max():
        return np.full(len(counts), margin, np.float32)
    f = counts ** -0.25
    t = (f - f.min()) / (f.max() - f.min())  # 1 for the rarest id, 0 for the most common
    return (margin / 2 + (margin - margin / 2) * t).astype(np.float32)


class ArcFace(CosineHead):
    name = "arcface"
    SETTINGS = ("model.embedding_size", "model.subcenters", "model.arcface_margin", "model.arcface_scale",
                "model.arcface_dynamic_margin", "model.arcface_centre_weight")

    def prepare(self, class_counts) -> None:
        self.margins = id_margins(class_counts, self.arcface_margin, self.arcface_dynamic_margin)

    def outputs(self, pooled, n_classes):
        dense = keras.layers.Dense(self.embedding_size, dtype="float32", name="embedding_dense")(pooled)
        emb = keras.layers.BatchNormalization(dtype="float32", name="embedding_bn")(dense)
        emb = L2Normalize(name="embedding")(emb)
        return CosineCentres(n_classes, self.subcenters, name="centres")(emb)

    def loss(self):
        margins = getattr(self, "margins", None)
        if margins is None:
            raise RuntimeError("ArcFace.prepare(class_counts) must run before loss() (a bug)")
        return ArcFaceLoss(margins, self.arcface_scale)

    def metrics(self, n_classes):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def scorer(self, net, encode, classes, gallery):
        retrieval, ids = super().scorer(net, encode, classes, gallery)
        w = self.arcface_centre_weight
        if w <= 0:
            return retrieval, ids
        centres = np.asarray(net.get_layer("centres").unit_centres(), np.float32)
        return CentreMix(retrieval, centres, self.subcenters, classes, w), ids


class CentreMix:
    """Per id: w * (1 + cosine to its nearest centre) / 2 + (1 - w) * its best gallery photo, for the
    ids the model was trained on; the gallery score alone for the others."""

    def __init__(self, retrieval: GalleryScorer, centres: np.ndarray, subcenters: int, trained: list[str], w: float):
        self.retrieval, self.centres, self.k, self.w = retrieval, centres, subcenters, w
        position = {c: i for i, c in enumerate(retrieval.classes)}
        self.columns = np.array([position.get(c, -1) for c in trained])

    def predict_on_batch(self, images):
        vectors = self.retrieval.encode(images)
        scores = self.retrieval.scores(vectors)
        cos = (np.asarray(vectors, np.float32) @ self.centres).reshape(len(vectors), -1, self.k).max(-1)
        ok = self.columns >= 0
        cols = self.columns[ok]
        scores[:, cols] = self.w * np.clip(0.5 * (1 + cos[:, ok]), 0, 1) + (1 - self.w) * scores[:, cols]
        return scores
