"""The embedding heads (seeds 001-004): Keras layers, in-batch losses and metrics, and inference.

    siamese  (Koch et al.) a shared encoder gives a sigmoid embedding; PairHead scores every pair of
             the batch with one dense unit on |x-y| (model.pair_features = l1) or on x+y, x*y, |x-y|,
             (x-y)^2 (rich). Loss: binary cross-entropy on one positive and one negative pair per
             photo (balanced); a share train.hard_negatives of the negatives is the photo's hardest
             (highest-scoring) other-id photo in the batch.
    triplet  (FaceNet / seed 004) an L2-normalised embedding; triplet loss with margin on squared
             distances, semi-hard mining within the batch: for each (anchor, positive) the closest
             negative that is farther than the positive, else the farthest negative.

Batches are P ids x K photos (batches.py); y_true per photo is (label, u_pos, u_neg, u_hard), the
uniforms that pick the siamese partners, so the model holds no random state of its own and a
resumed training repeats an uninterrupted one. The saved model's layer "embedding" is the photo's
vector; Embedder cuts the encoder out of it for prediction, where retrieval.py compares vectors in NumPy.

Imports Keras at import time: the stages import it inside their run functions.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from .retrieval import FEATURES, PairWeights, pair_similarity, similarity

LARGE = 1e9


# ---------------------------------------------------------------- layers

@keras.saving.register_keras_serializable(package="whaleid")
class L2Normalize(keras.layers.Layer):
    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, x):
        x = ops.cast(x, "float32")
        return x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))

    def compute_output_shape(self, input_shape):
        return input_shape


def pair_features(a, b, features: str):
    parts = {"sum": lambda: a + b, "product": lambda: a * b, "absdiff": lambda: ops.abs(a - b),
             "sqdiff": lambda: ops.square(a - b)}
    names = FEATURES[features]
    out = [parts[n]() for n in names]
    return out[0] if len(out) == 1 else ops.concatenate(out, axis=-1)


@keras.saving.register_keras_serializable(package="whaleid")
class PairHead(keras.layers.Layer):
    """(B, d) embeddings -> (B, B) logits that photos i and j show the same id. One dense unit on the
    pair's features (retrieval.FEATURES order), so retrieval.pair_logits reproduces it exactly."""

    def __init__(self, features: str = "l1", **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if features not in FEATURES:
            raise ValueError(f"model.pair_features = {features!r}: expected one of {', '.join(FEATURES)}")
        self.features = features
        self.score = keras.layers.Dense(1, name="score", dtype="float32")

    def build(self, input_shape):
        self.score.build((None, len(FEATURES[self.features]) * int(input_shape[-1])))

    def call(self, x):
        x = ops.cast(x, "float32")
        f = pair_features(x[:, None, :], x[None, :, :], self.features)
        return ops.squeeze(self.score(f), axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[0])

    def get_config(self):
        return {**super().get_config(), "features": self.features}


def embedding_layers(x, head: str, size: int, pair_features_: str = "l1"):
    """Pooled features -> (embedding, training output). siamese: sigmoid units (Koch), output the
    batch's pair logits; triplet: linear units, L2-normalised, output the embedding itself."""
    L = keras.layers
    if size < 2:
        raise ValueError(f"model.embedding_size = {size}: at least 2")
    if head == "siamese":
        emb = L.Dense(size, activation="sigmoid", dtype="float32", name="embedding")(x)
        return emb, PairHead(pair_features_, name="pair_head")(emb)
    if head == "triplet":
        emb = L2Normalize(name="embedding")(L.Dense(size, dtype="float32", name="embedding_dense")(x))
        return emb, emb
    raise ValueError(f"model.head = {head!r} has no embedding")


# ---------------------------------------------------------------- in-batch pairs and triplets

def _labels(y_true):
    y = ops.reshape(y_true, (ops.shape(y_true)[0], -1))
    return ops.cast(ops.round(y[:, 0]), "int32"), y


def _masks(labels):
    n = ops.shape(labels)[0]
    same = ops.equal(labels[:, None], labels[None, :])
    r = ops.arange(n)
    eye = ops.equal(r[:, None], r[None, :])
    return ops.logical_and(same, ops.logical_not(eye)), ops.logical_not(same)


def _kth_true(mask, u):
    """Per row, the index of its floor(u * count)-th True entry; and whether the row has one."""
    m = ops.cast(mask, "int32")
    count = ops.sum(m, axis=1)
    k = ops.minimum(ops.cast(ops.floor(ops.cast(u, "float32") * ops.cast(count, "float32")), "int32"),
                    ops.maximum(count - 1, 0))
    hit = ops.logical_and(mask, ops.equal(ops.cumsum(m, axis=1) - 1, k[:, None]))
    return ops.cast(ops.argmax(ops.cast(hit, "int32"), axis=1), "int32"), count > 0


def pair_partners(labels, u_pos, u_neg, logits=None, u_hard=None, hard_fraction: float = 0.0):
    """For each photo of the batch: (positive index, has one, negative index, has one). The positive is
    a uniformly drawn other photo of its id; the negative a uniformly drawn photo of another id, or,
    when u_hard < hard_fraction, the other-id photo with the highest logit (the hardest)."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    pos_mask, neg_mask = _masks(labels)
    pos, has_pos = _kth_true(pos_mask, u_pos)
    neg, has_neg = _kth_true(neg_mask, u_neg)
    if hard_fraction > 0 and logits is not None:
        hardest = ops.cast(ops.argmax(ops.where(neg_mask, ops.cast(logits, "float32"), -LARGE), axis=1), "int32")
        neg = ops.where(ops.cast(u_hard, "float32") < hard_fraction, hardest, neg)
    return pos, has_pos, neg, has_neg


def _pick(matrix, index):
    return ops.squeeze(ops.take_along_axis(matrix, ops.cast(index, "int32")[:, None], axis=1), axis=1)


def _pair_terms(y_true, logits, hard_fraction):
    labels, y = _labels(y_true)
    logits = ops.cast(logits, "float32")
    pos, has_pos, neg, has_neg = pair_partners(labels, y[:, 1], y[:, 2], logits, y[:, 3], hard_fraction)
    return _pick(logits, pos), ops.cast(has_pos, "float32"), _pick(logits, neg), ops.cast(has_neg, "float32")


@keras.saving.register_keras_serializable(package="whaleid")
class PairLoss(keras.losses.Loss):
    """Binary cross-entropy on balanced pairs of the batch: each photo with its positive (label 1) and
    its negative (label 0), from the logits matrix PairHead gives."""

    def __init__(self, hard_negatives: float = 0.0, name: str = "loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.hard_negatives = float(hard_negatives)

    def call(self, y_true, y_pred):
        lp, wp, ln, wn = _pair_terms(y_true, y_pred, self.hard_negatives)
        total = ops.sum(wp * ops.softplus(-lp)) + ops.sum(wn * ops.softplus(ln))
        return total / ops.maximum(ops.sum(wp) + ops.sum(wn), 1.0)

    def get_config(self):
        return {**super().get_config(), "hard_negatives": self.hard_negatives}


def pair_accuracy(y_true, y_pred):
    """Share of the batch's random (not hard) positive and negative pairs on the right side of 0.5."""
    lp, wp, ln, wn = _pair_terms(y_true, y_pred, 0.0)
    right = ops.sum(wp * ops.cast(lp > 0, "float32")) + ops.sum(wn * ops.cast(ln < 0, "float32"))
    return right / ops.maximum(ops.sum(wp) + ops.sum(wn), 1.0)


def squared_distances(e):
    e = ops.cast(e, "float32")
    sq = ops.sum(e * e, axis=1)
    return ops.maximum(sq[:, None] + sq[None, :] - 2.0 * ops.matmul(e, ops.transpose(e)), 0.0)


def semi_hard_triplet_terms(labels, embeddings, margin: float):
    """(loss per (anchor, positive) pair (B, B), valid mask (B, B)): max(d_ap - d_an + margin, 0) with
    d_an the semi-hard negative's distance (as tfa.losses.TripletSemiHardLoss, on squared distances)."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    d = squared_distances(embeddings)
    pos_mask, neg_mask = _masks(labels)
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
        labels, _ = _labels(y_true)
        terms, valid = semi_hard_triplet_terms(labels, y_pred, self.margin)
        w = ops.cast(valid, "float32")
        return ops.sum(terms * w) / ops.maximum(ops.sum(w), 1.0)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def triplet_accuracy(y_true, y_pred):
    """Share of the batch's (anchor, positive, negative) triplets with d(a, p) < d(a, n) (seed 004)."""
    labels, _ = _labels(y_true)
    d = squared_distances(y_pred)
    pos_mask, neg_mask = _masks(labels)
    mask = ops.logical_and(pos_mask[:, :, None], neg_mask[:, None, :])
    right = ops.logical_and(mask, d[:, :, None] < d[:, None, :])
    return ops.sum(ops.cast(right, "float32")) / ops.maximum(ops.sum(ops.cast(mask, "float32")), 1.0)


def loss(head: str, margin: float, hard_negatives: float):
    return PairLoss(hard_negatives) if head == "siamese" else TripletLoss(margin)


def metrics(head: str) -> list:
    fn = pair_accuracy if head == "siamese" else triplet_accuracy
    return [keras.metrics.MeanMetricWrapper(fn, name="accuracy")]


# ---------------------------------------------------------------- inference

def pair_weights(net: keras.Model) -> PairWeights:
    layer = net.get_layer("pair_head")
    kernel, bias = layer.score.get_weights()
    return PairWeights(np.asarray(kernel, np.float32).reshape(-1), float(np.asarray(bias).reshape(-1)[0]), layer.features)


def head_of(net: keras.Model) -> str:
    names = {layer.name for layer in net.layers}
    return "siamese" if "pair_head" in names else "triplet" if "embedding" in names else "softmax"


class Embedder:
    """A trained model as retrieval needs it: images -> vectors (class probabilities for softmax, the
    embedding layer otherwise) and the head's similarity between vectors. Works on the model being
    trained too (the siamese pair weights are read at each comparison)."""

    def __init__(self, net: keras.Model, head: str | None = None):
        self.net, self.head = net, head or head_of(net)
        if self.head != head_of(net):
            raise ValueError(f"the model has a {head_of(net)} head, not {self.head}")
        self.encoder = net if self.head == "softmax" else keras.Model(net.inputs, net.get_layer("embedding").output)

    @property
    def pair(self) -> PairWeights | None:
        return pair_weights(self.net) if self.head == "siamese" else None

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.encoder.predict_on_batch(np.asarray(images, np.float32)), np.float32)

    def encode_files(self, paths: list[str], image_size: int, batch_size: int, progress: bool = True,
                     desc: str = "embed") -> np.ndarray:
        """Vectors of augment's image files (image_size JPEGs), in batches of batch_size (the last one
        padded, so the model is traced once)."""
        from tqdm import tqdm
        from .train import eval_dataset
        if not paths:
            return np.zeros((0, 0), np.float32)
        out = []
        ds = eval_dataset(list(paths), [0] * len(paths), image_size, batch_size)
        for images, _ in tqdm(ds.as_numpy_iterator(), total=-(-len(paths) // batch_size), desc=desc,
                              disable=not progress, unit="batch", dynamic_ncols=True, mininterval=0.5):
            n = len(images)
            if n < batch_size:
                images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])
            out.append(self.encode(images)[:n])
        return np.concatenate(out)

    def similarity(self, Q: np.ndarray, G: np.ndarray) -> np.ndarray:
        return similarity(self.head, Q, G, self.pair)

    def pair_similarity(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        return pair_similarity(self.head, A, B, self.pair)
