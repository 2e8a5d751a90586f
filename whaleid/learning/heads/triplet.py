"""triplet (FaceNet, seed 004): an L2-normalised embedding; triplet loss with a margin on squared
distances and semi-hard mining within the P ids x K photos batch: for each (anchor, positive) the
closest negative farther than the positive, else the farthest negative. Similarity at prediction:
(1 + a.b) / 2 = 1 - |a-b|^2 / 4, in [0, 1]."""
from __future__ import annotations

import keras
from keras import ops

from whaleid.learning.heads.base import CosineHead, L2Normalize, as_rows, labels_of, same_and_other, whole_batch

LARGE = 1e9


def squared_distances(e, others=None):
    """(n, n) squared distances of e's rows, or (n, N) from e's rows to others' rows."""
    e = ops.cast(e, "float32")
    others = e if others is None else ops.cast(others, "float32")
    sq, so = ops.sum(e * e, axis=1), ops.sum(others * others, axis=1)
    return ops.maximum(sq[:, None] + so[None, :] - 2.0 * ops.matmul(e, ops.transpose(others)), 0.0)


def semi_hard_triplet_terms(labels, embeddings, margin: float, all_labels=None, all_embeddings=None, offset=0):
    """(loss per (anchor, positive) pair (B, B), valid mask (B, B)): max(d_ap - d_an + margin, 0) with
    d_an the semi-hard negative's distance (as tfa.losses.TripletSemiHardLoss, on squared distances).
    With all_labels / all_embeddings (the global batch; these anchors are its rows offset ..):
    (n, N), positives and negatives from the global batch."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    if all_labels is not None:
        all_labels = ops.cast(ops.reshape(all_labels, (-1,)), "int32")
    d = squared_distances(embeddings, all_embeddings)
    pos_mask, neg_mask = same_and_other(labels, all_labels, offset)
    d_ap, d_an = d[:, :, None], d[:, None, :]
    semi = ops.logical_and(neg_mask[:, None, :], d_an > d_ap)
    outside = ops.min(ops.where(semi, d_an, LARGE), axis=2)
    inside = ops.max(ops.where(neg_mask, d, -LARGE), axis=1)
    chosen = ops.where(ops.any(semi, axis=2), outside, inside[:, None])
    valid = ops.logical_and(pos_mask, ops.any(neg_mask, axis=1)[:, None])
    return ops.maximum(d - chosen + margin, 0.0), valid


@keras.saving.register_keras_serializable(package="whaleid")
class TripletLoss(keras.losses.Loss):
    def __init__(self, margin: float = 1.0, name: str = "loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        """The mean over the global batch's valid (anchor, positive) pairs (one value per anchor, see
        base.as_rows)."""
        labels, _ = labels_of(y_true)
        (all_labels, all_e), offset = whole_batch(labels, y_pred)
        terms, valid = semi_hard_triplet_terms(labels, y_pred, self.margin, all_labels, all_e, offset)
        w = ops.cast(valid, "float32")
        return as_rows(ops.sum(terms * w, axis=1), ops.sum(w))

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def triplet_accuracy(y_true, y_pred):
    """Share of the batch's (anchor, positive, negative) triplets with d(a, p) < d(a, n) (seed 004)."""
    return ops.mean(triplet_accuracy_rows(y_true, y_pred))


def triplet_accuracy_rows(y_true, y_pred):
    """triplet_accuracy as one value per anchor (base.as_rows), for the Keras metric on several replicas."""
    labels, _ = labels_of(y_true)
    (all_labels, all_e), offset = whole_batch(labels, y_pred)
    d = squared_distances(y_pred, all_e)
    pos_mask, neg_mask = same_and_other(labels, all_labels, offset)
    mask = ops.logical_and(pos_mask[:, :, None], neg_mask[:, None, :])
    right = ops.logical_and(mask, d[:, :, None] < d[:, None, :])
    return as_rows(ops.sum(ops.cast(right, "float32"), axis=(1, 2)), ops.sum(ops.cast(mask, "float32")))


class Triplet(CosineHead):
    name = "triplet"
    SETTINGS = ("model.embedding_size", "train.margin")
    per_id_batches = True

    def outputs(self, pooled, n_classes):
        dense = keras.layers.Dense(self.embedding_size, dtype="float32", name="embedding_dense")(pooled)
        return L2Normalize(name="embedding")(dense)

    def loss(self):
        return TripletLoss(self.margin)

    def metrics(self, n_classes):
        return [keras.metrics.MeanMetricWrapper(triplet_accuracy_rows, name="accuracy")]
