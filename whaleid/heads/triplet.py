"""triplet (FaceNet, seed 004): an L2-normalised embedding; triplet loss with a margin on squared
distances and semi-hard mining within the P ids x K photos batch: for each (anchor, positive) the
closest negative farther than the positive, else the farthest negative. Similarity at prediction:
(1 + a.b) / 2 = 1 - |a-b|^2 / 4, in [0, 1]."""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from .base import Head, L2Normalize, labels_of, same_and_other

LARGE = 1e9


def squared_distances(e):
    e = ops.cast(e, "float32")
    sq = ops.sum(e * e, axis=1)
    return ops.maximum(sq[:, None] + sq[None, :] - 2.0 * ops.matmul(e, ops.transpose(e)), 0.0)


def semi_hard_triplet_terms(labels, embeddings, margin: float):
    """(loss per (anchor, positive) pair (B, B), valid mask (B, B)): max(d_ap - d_an + margin, 0) with
    d_an the semi-hard negative's distance (as tfa.losses.TripletSemiHardLoss, on squared distances)."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    d = squared_distances(embeddings)
    pos_mask, neg_mask = same_and_other(labels)
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
        labels, _ = labels_of(y_true)
        terms, valid = semi_hard_triplet_terms(labels, y_pred, self.margin)
        w = ops.cast(valid, "float32")
        return ops.sum(terms * w) / ops.maximum(ops.sum(w), 1.0)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def triplet_accuracy(y_true, y_pred):
    """Share of the batch's (anchor, positive, negative) triplets with d(a, p) < d(a, n) (seed 004)."""
    labels, _ = labels_of(y_true)
    d = squared_distances(y_pred)
    pos_mask, neg_mask = same_and_other(labels)
    mask = ops.logical_and(pos_mask[:, :, None], neg_mask[:, None, :])
    right = ops.logical_and(mask, d[:, :, None] < d[:, None, :])
    return ops.sum(ops.cast(right, "float32")) / ops.maximum(ops.sum(ops.cast(mask, "float32")), 1.0)


class Triplet(Head):
    name = "triplet"
    SETTINGS = ("model.embedding_size", "train.margin")
    per_id_batches = True

    def outputs(self, pooled, n_classes):
        dense = keras.layers.Dense(self.embedding_size, dtype="float32", name="embedding_dense")(pooled)
        return L2Normalize(name="embedding")(dense)

    def loss(self):
        return TripletLoss(self.margin)

    def metrics(self, n_classes):
        return [keras.metrics.MeanMetricWrapper(triplet_accuracy, name="accuracy")]

    def similarity(self, net, Q, G):
        return np.clip(0.5 * (1.0 + np.asarray(Q, np.float32) @ np.asarray(G, np.float32).T), 0.0, 1.0)

    def pair_similarity(self, net, A, B):
        dot = np.einsum("ij,ij->i", np.asarray(A, np.float32), np.asarray(B, np.float32))
        return np.clip(0.5 * (1.0 + dot), 0.0, 1.0)
