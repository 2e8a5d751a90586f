"""siamese (Koch et al., seed 001): a shared encoder gives a sigmoid embedding; the pair head scores
two photos with one dense unit on |x-y| (model.pair_features = l1) or on x+y, x*y, |x-y|, (x-y)^2
(rich). Trained on every photo of a P ids x K photos batch with one positive and one negative
partner (binary cross-entropy, balanced); a share train.hard_negatives of the negatives is the
photo's hardest (highest-scoring) other-id photo in the batch. The partners are drawn from uniforms
that travel in y (batches.py draws them from (seed, epoch)), so the model holds no random state and
a resumed training repeats an uninterrupted one. At prediction the same pair head runs in NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from whaleid.learning.heads.base import Head, as_rows, labels_of, same_and_other, whole_batch

FEATURES = {"l1": ("absdiff",), "rich": ("sum", "product", "absdiff", "sqdiff")}
LARGE = 1e9
MAX_ELEMENTS = 1 << 24  # floats in one chunk of |q - g| (64 MB)


def pair_features(a, b, features: str, xp):
    """The pair head's input, in FEATURES order; xp = keras.ops (training) or numpy (prediction)."""
    parts = {"sum": lambda: a + b, "product": lambda: a * b, "absdiff": lambda: xp.abs(a - b),
             "sqdiff": lambda: xp.square(a - b)}
    out = [parts[n]() for n in FEATURES[features]]
    return out[0] if len(out) == 1 else xp.concatenate(out, axis=-1)


@keras.saving.register_keras_serializable(package="whaleid")
class PairHead(keras.layers.Layer):
    """(B, d) embeddings -> (B, B) logits that photos i and j show the same id. On one of several
    replicas: (b, B), this replica's b photos against every photo of the global batch (base.py)."""

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
        (everyone,), _ = whole_batch(x)
        return ops.squeeze(self.score(pair_features(x[:, None, :], everyone[None, :, :], self.features, ops)), axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[0])

    def get_config(self):
        return {**super().get_config(), "features": self.features}


# ---------------------------------------------------------------- in-batch partners and the loss

def _kth_true(mask, u):
    """Per row, the index of its floor(u * count)-th True entry; and whether the row has one."""
    m = ops.cast(mask, "int32")
    count = ops.sum(m, axis=1)
    k = ops.minimum(ops.cast(ops.floor(ops.cast(u, "float32") * ops.cast(count, "float32")), "int32"),
                    ops.maximum(count - 1, 0))
    hit = ops.logical_and(mask, ops.equal(ops.cumsum(m, axis=1) - 1, k[:, None]))
    return ops.cast(ops.argmax(ops.cast(hit, "int32"), axis=1), "int32"), count > 0


def pair_partners(labels, u_pos, u_neg, logits=None, u_hard=None, hard_fraction: float = 0.0,
                  all_labels=None, offset=0):
    """For each photo of the batch: (positive index, has one, negative index, has one). The positive is
    a uniformly drawn other photo of its id; the negative a uniformly drawn photo of another id, or,
    when u_hard < hard_fraction, the other-id photo with the highest logit (the hardest). With
    all_labels: partners drawn from the global batch (indices into it; these photos are its rows
    offset ..), logits (n, N)."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    if all_labels is not None:
        all_labels = ops.cast(ops.reshape(all_labels, (-1,)), "int32")
    pos_mask, neg_mask = same_and_other(labels, all_labels, offset)
    pos, has_pos = _kth_true(pos_mask, u_pos)
    neg, has_neg = _kth_true(neg_mask, u_neg)
    if hard_fraction > 0 and logits is not None:
        hardest = ops.cast(ops.argmax(ops.where(neg_mask, ops.cast(logits, "float32"), -LARGE), axis=1), "int32")
        neg = ops.where(ops.cast(u_hard, "float32") < hard_fraction, hardest, neg)
    return pos, has_pos, neg, has_neg


def _pick(matrix, index):
    return ops.squeeze(ops.take_along_axis(matrix, ops.cast(index, "int32")[:, None], axis=1), axis=1)


def _pair_terms(y_true, logits, hard_fraction):
    """Per photo of this replica: (positive's logit, has one, negative's logit, has one); partners
    from the global batch (logits: (n, N) from PairHead)."""
    labels, y = labels_of(y_true)
    logits = ops.cast(logits, "float32")
    (all_labels,), offset = whole_batch(labels)
    pos, has_pos, neg, has_neg = pair_partners(labels, y[:, 1], y[:, 2], logits, y[:, 3], hard_fraction,
                                               all_labels, offset)
    return _pick(logits, pos), ops.cast(has_pos, "float32"), _pick(logits, neg), ops.cast(has_neg, "float32")


@keras.saving.register_keras_serializable(package="whaleid")
class PairLoss(keras.losses.Loss):
    """Binary cross-entropy on balanced pairs of the batch: each photo with its positive (label 1) and
    its negative (label 0), from the logits matrix PairHead gives; the mean over the global batch's
    pairs (one value per photo, see base.as_rows)."""

    def __init__(self, hard_negatives: float = 0.0, name: str = "loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.hard_negatives = float(hard_negatives)

    def call(self, y_true, y_pred):
        lp, wp, ln, wn = _pair_terms(y_true, y_pred, self.hard_negatives)
        return as_rows(wp * ops.softplus(-lp) + wn * ops.softplus(ln), ops.sum(wp) + ops.sum(wn))

    def get_config(self):
        return {**super().get_config(), "hard_negatives": self.hard_negatives}


def pair_accuracy_rows(y_true, y_pred):
    """pair_accuracy as one value per photo (base.as_rows), for the Keras metric on several replicas."""
    lp, wp, ln, wn = _pair_terms(y_true, y_pred, 0.0)
    return as_rows(wp * ops.cast(lp > 0, "float32") + wn * ops.cast(ln < 0, "float32"), ops.sum(wp) + ops.sum(wn))


def pair_accuracy(y_true, y_pred):
    """Share of the batch's random (not hard) positive and negative pairs on the right side of 0.5."""
    return ops.mean(pair_accuracy_rows(y_true, y_pred))


# ---------------------------------------------------------------- the pair head in NumPy

@dataclass(frozen=True)
class PairWeights:
    """The trained pair head: logit = bias + kernel . concat(features of the pair)."""
    kernel: np.ndarray      # (len(FEATURES[features]) * d,)
    bias: float
    features: str = "l1"

    @classmethod
    def of(cls, net: keras.Model) -> "PairWeights":
        layer = net.get_layer("pair_head")
        kernel, bias = layer.score.get_weights()
        return cls(np.asarray(kernel, np.float32).reshape(-1), float(np.asarray(bias).reshape(-1)[0]), layer.features)

    def per_feature(self) -> list[tuple[str, np.ndarray]]:
        names = FEATURES[self.features]
        return list(zip(names, np.asarray(self.kernel, np.float32).reshape(len(names), -1)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float32)))).astype(np.float32)


def pair_logits(Q: np.ndarray, G: np.ndarray, pair: PairWeights, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """(nq, ng) logits for every (query, gallery) pair: each feature's term as matrix products where
    it has a product form; |a-b| in chunks of queries, so memory stays bounded for a 25k gallery."""
    Q, G = np.asarray(Q, np.float32), np.asarray(G, np.float32)
    out = np.full((len(Q), len(G)), pair.bias, np.float32)
    for name, w in pair.per_feature():
        if name == "sum":
            out += (Q @ w)[:, None] + (G @ w)[None, :]
        elif name == "product":
            out += (Q * w) @ G.T
        elif name == "sqdiff":
            out += ((Q * Q) @ w)[:, None] + ((G * G) @ w)[None, :] - 2.0 * ((Q * w) @ G.T)
        else:  # absdiff
            step = max(1, max_elements // max(1, G.size))
            for s in range(0, len(Q), step):
                out[s:s + step] += np.abs(Q[s:s + step, None, :] - G[None, :, :]) @ w
    return out


class Siamese(Head):
    name = "siamese"
    SETTINGS = ("model.embedding_size", "model.pair_features", "train.hard_negatives")
    per_id_batches = True

    def outputs(self, pooled, n_classes):
        emb = keras.layers.Dense(self.embedding_size, activation="sigmoid", dtype="float32", name="embedding")(pooled)
        return PairHead(self.pair_features, name="pair_head")(emb)

    def loss(self):
        return PairLoss(self.hard_negatives)

    def metrics(self, n_classes):
        return [keras.metrics.MeanMetricWrapper(pair_accuracy_rows, name="accuracy")]

    def similarity(self, net, Q, G):
        return sigmoid(pair_logits(Q, G, PairWeights.of(net)))

    def similarity_ops(self, net, Q, G):
        """sigmoid of the pair head's logits, in keras ops ((nq, ng, d) for |q - g|: callers chunk Q)."""
        pair = PairWeights.of(net)
        Q, G = ops.cast(Q, "float32"), ops.cast(G, "float32")
        out = ops.zeros((ops.shape(Q)[0], ops.shape(G)[0]), "float32") + pair.bias
        for name, w in pair.per_feature():
            w = ops.convert_to_tensor(w)
            if name == "sum":
                out = out + ops.matmul(Q, w)[:, None] + ops.matmul(G, w)[None, :]
            elif name == "product":
                out = out + ops.matmul(Q * w, ops.transpose(G))
            elif name == "sqdiff":
                out = out + (ops.matmul(Q * Q, w)[:, None] + ops.matmul(G * G, w)[None, :]
                             - 2.0 * ops.matmul(Q * w, ops.transpose(G)))
            else:
                out = out + ops.matmul(ops.abs(Q[:, None, :] - G[None, :, :]), w)
        return ops.sigmoid(out)

    def pair_similarity(self, net, A, B):
        pair = PairWeights.of(net)
        f = pair_features(np.asarray(A, np.float32), np.asarray(B, np.float32), pair.features, np)
        return sigmoid(f @ pair.kernel + pair.bias)
