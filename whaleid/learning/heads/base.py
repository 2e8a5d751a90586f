"""What every head is: the layers after the pooled backbone features, its loss and metrics, how its
training batches are laid out, what early stopping watches, and how two photos compare at
prediction time (in NumPy, on the vectors its encoder gives).

The trainer, predict and evaluate only talk to this interface; they never ask which head they have.
A head's name and settings travel inside the saved model (the HeadTag layer), so a loaded model
knows its head without guessing from layer names.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from whaleid.similarity.gallery import GalleryScorer

TAG = "head"  # the HeadTag layer's name in every whaleid model


@keras.saving.register_keras_serializable(package="whaleid")
class HeadTag(keras.layers.Layer):
    """Identity on the model's output that records which head built the model, with its settings."""

    def __init__(self, head: str, settings: dict | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.head, self.settings = head, dict(settings or {})

    def call(self, x):
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "head": self.head, "settings": self.settings}


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


class Head:
    """Subclasses set `name`, SETTINGS (the dotted config keys they read; their values become
    attributes named by the key's last part) and override what differs."""
    name = "?"
    SETTINGS: tuple[str, ...] = ()
    per_id_batches = False      # True: batches of P ids x K photos, y = (label, u_pos, u_neg, u_hard)
    monitor = "val_map5"        # what early stopping maximises (val_* from retrieval validation)
    retrieval_validation = True  # validate by ranking validation photos against the training photos
    embedding_layer = "embedding"  # the layer whose output is a photo's vector (None: the model output)

    def __init__(self, **settings):
        self.settings = settings
        for key, value in settings.items():
            setattr(self, key, value)

    @classmethod
    def from_settings(cls, get) -> "Head":
        """`get(dotted_key)` -> value, e.g. a stage Run's setting or config.get over a settings dict."""
        return cls(**{key.split(".", 1)[1]: get(key) for key in cls.SETTINGS})

    # ---------------------------------------------------------------- training
    def prepare(self, class_counts) -> None:
        """Told the number of training photos of each class before the model is built (a per-class
        margin needs it); most heads need nothing."""

    def build(self, pooled, n_classes: int):
        """Pooled (and dropped-out) features -> the training output, tagged with this head."""
        return HeadTag(self.name, self.settings, name=TAG)(self.outputs(pooled, n_classes))

    def outputs(self, pooled, n_classes: int):
        raise NotImplementedError

    def loss(self) -> keras.losses.Loss:
        raise NotImplementedError

    def metrics(self, n_classes: int) -> list:
        return []

    # ---------------------------------------------------------------- prediction
    def encoder(self, net: keras.Model) -> keras.Model:
        """images -> the vectors `similarity` compares."""
        if self.embedding_layer is None:
            return net
        return keras.Model(net.inputs, net.get_layer(self.embedding_layer).output)

    def similarity(self, net: keras.Model, Q: np.ndarray, G: np.ndarray) -> np.ndarray:
        """(nq, ng) similarities in [0, 1]; one new_whale threshold and sweep serve every head."""
        raise NotImplementedError

    def similarity_ops(self, net: keras.Model, Q, G):
        """`similarity` in keras ops, computed where Q and G live (training's validation scores on the
        device); None: the head has only the NumPy version (the caller falls back to it)."""
        return None

    def pair_similarity(self, net: keras.Model, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """(n,) similarities of aligned rows A[i], B[i]. Default: the diagonal, in row blocks."""
        A, B = np.asarray(A, np.float32), np.asarray(B, np.float32)
        out = np.empty(len(A), np.float32)
        for s in range(0, len(A), 256):
            out[s:s + 256] = np.diagonal(self.similarity(net, A[s:s + 256], B[s:s + 256]))
        return out

    def scorer(self, net: keras.Model, encode, classes: list[str], gallery):
        """(model-like object whose predict_on_batch(images) gives a score per id, the ids) for
        predict and evaluate. Default: retrieval, each id's best gallery photo; `gallery()` embeds
        the gallery with `encode` and returns (vectors, ids). `classes`: the ids trained on."""
        vectors, ids = gallery()
        s = GalleryScorer(encode, lambda q, g: self.similarity(net, q, g), vectors, ids)
        return s, s.classes


class CosineHead(Head):
    """A head whose vectors are unit embeddings: similarity (1 + a.b) / 2 = 1 - |a-b|^2 / 4, in [0, 1]."""

    def similarity(self, net, Q, G):
        return np.clip(0.5 * (1.0 + np.asarray(Q, np.float32) @ np.asarray(G, np.float32).T), 0.0, 1.0)

    def similarity_ops(self, net, Q, G):
        return ops.clip(0.5 * (1.0 + ops.matmul(ops.cast(Q, "float32"), ops.transpose(ops.cast(G, "float32")))), 0.0, 1.0)

    def pair_similarity(self, net, A, B):
        dot = np.einsum("ij,ij->i", np.asarray(A, np.float32), np.asarray(B, np.float32))
        return np.clip(0.5 * (1.0 + dot), 0.0, 1.0)


def labels_of(y_true):
    """The id labels of a batch's y (plain labels, or the first column of the P x K layout's rows)."""
    y = ops.reshape(y_true, (ops.shape(y_true)[0], -1))
    return ops.cast(ops.round(y[:, 0]), "int32"), y


def same_and_other(labels, all_labels=None, offset=0):
    """(same id and not the photo itself, other id) masks of a batch: (n, n), or with all_labels (the
    global batch, in which these n photos are rows offset .. offset+n-1) (n, N)."""
    all_labels = labels if all_labels is None else all_labels
    same = ops.equal(labels[:, None], all_labels[None, :])
    rows = ops.arange(ops.shape(labels)[0]) + ops.cast(offset, "int32")
    eye = ops.equal(rows[:, None], ops.arange(ops.shape(all_labels)[0])[None, :])
    return ops.logical_and(same, ops.logical_not(eye)), ops.logical_not(same)


# ---------------------------------------------------------------- in-batch losses on several replicas
#
# tf.distribute gives each replica a contiguous slice of the global batch, and Keras reduces a loss per
# replica: the mean of its rows' values, divided by the replica count (so that the gradients' sum over
# replicas is the mean over the global batch); a loss that returns one scalar is neither averaged nor
# divided (keras/src/losses/loss.py: reduce_values returns a () value unchanged), so its gradients and
# logged value come out replicas x too large. The in-batch losses (siamese, triplet) therefore (1) see
# the whole global batch: each replica compares its own photos with every photo of the batch
# (all_gather, whose gradient returns to each replica its rows' share), so mining and the positives and
# negatives are the ones one device would use; and (2) return one value per row (`as_rows`) scaled so
# that Keras' reduction gives sum(terms) / count over the global batch. Value and gradients then equal
# those of one device on the same global batch (tests/test_replicas.py).

def replica_context():
    """tf.distribute's replica context when there are several replicas, else None."""
    import tensorflow as tf
    ctx = tf.distribute.get_replica_context()
    return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


def whole_batch(*tensors):
    """(the global batch of each tensor (every replica's rows, in replica order), the index of this
    replica's first row in it). One replica (or outside tf.distribute): the tensors themselves, 0."""
    ctx = replica_context()
    if ctx is None:
        return list(tensors), 0
    import tensorflow as tf
    # (one gather per tensor, integers as float32: a collective wants one dtype, on the compute device)
    sizes = ctx.all_gather(tf.cast(tf.shape(tensors[0])[:1], tf.float32), axis=0)
    offset = tf.cast(tf.reduce_sum(sizes[:ctx.replica_id_in_sync_group]), tf.int32)
    out = []
    for t in tensors:
        t = tf.convert_to_tensor(t)
        if t.dtype.is_floating:
            out.append(ctx.all_gather(t, axis=0))
        else:  # labels: exact in float32 below 2^24
            out.append(tf.cast(ctx.all_gather(tf.cast(t, tf.float32), axis=0), t.dtype))
    return out, offset


def global_sum(x):
    """x summed over the replicas (no gradient: counts)."""
    x = ops.stop_gradient(ops.cast(x, "float32"))
    ctx = replica_context()
    if ctx is None:
        return x
    import tensorflow as tf
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def as_rows(row_sums, count):
    """Per-row values whose Keras reduction (their mean over this replica's rows, divided by the
    replica count; summed over replicas by the gradient all-reduce and by the logged loss) is
    sum(row_sums over the global batch) / (count summed over the replicas)."""
    ctx = replica_context()
    replicas = 1.0 if ctx is None else float(ctx.num_replicas_in_sync)
    rows = ops.cast(ops.shape(row_sums)[0], "float32")
    return ops.cast(row_sums, "float32") * (rows * replicas / ops.maximum(global_sum(count), 1.0))
