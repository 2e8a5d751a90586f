"""Where and how training runs: the distribution strategy, the float precision, seeds and op
determinism. CPU defaults favour exactness (float32, deterministic ops, no XLA: on a CPU XLA and
mixed precision are slower); GPUs and TPUs get mixed precision.
"""
from __future__ import annotations

import contextlib
import os

import keras
import tensorflow as tf

from .files import StageError


def make_strategy(name: str, echo=print):
    """auto: MirroredStrategy over all GPUs when there are several, else the default strategy.
    mirrored: all GPUs, or all (logical) CPU devices when there is no GPU. multiworker: TF_CONFIG.
    tpu: the TPU the resolver finds (TPU_NAME, or the local TPU VM)."""
    gpus = tf.config.list_logical_devices("GPU")
    if name == "none" or (name == "auto" and len(gpus) <= 1):
        return tf.distribute.get_strategy()
    if name in ("auto", "mirrored"):
        if gpus:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            echo("train.strategy = multiworker but TF_CONFIG is not set: training as a single worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except Exception as e:
            raise StageError(f"train.strategy = tpu: no TPU found ({' '.join(str(e).split())[:200]}). "
                             f"Set TPU_NAME, or use strategy auto.") from None
        return tf.distribute.TPUStrategy(resolver)
    raise StageError(f"train.strategy = {name!r}: expected auto, mirrored, multiworker, tpu or none")


def strategy_name(strategy) -> str:
    name = type(strategy).__name__
    return "default strategy" if name.startswith("_Default") else name


def accelerated(strategy) -> bool:
    return bool(tf.config.list_logical_devices("GPU")) or isinstance(strategy, tf.distribute.TPUStrategy)


def choose_precision(setting: str, strategy) -> str:
    """auto: mixed_float16 on GPUs, mixed_bfloat16 on TPUs, float32 on CPU (where both are slower)."""
    if setting != "auto":
        return setting
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "float32"


def seed_everything(seed: int, deterministic_ops: bool) -> None:
    """Python, NumPy, TF and Keras seeds (and Keras' global state: layer names, the global seed
    generator). Op determinism where it is cheap (CPU): on GPUs some kernels have no deterministic
    version and it costs speed there."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras' global dtype policy for the models built inside, restored to float32 afterwards."""
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")
