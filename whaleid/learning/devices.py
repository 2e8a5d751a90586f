"""Where and how training runs: the distribution strategy, the float precision, seeds and op
determinism, and what several replicas or workers must agree on. CPU defaults favour exactness
(float32, deterministic ops, no XLA: on a CPU XLA and mixed precision are slower); GPUs and TPUs get
mixed precision.

    make_strategy(name)            the tf.distribute strategy (asks only for physical devices first:
                                   a multi-worker strategy must be created before TF's runtime starts)
    choose_precision(setting, s)   float32 | mixed_float16 | mixed_bfloat16
    check_supported(get, s, p)     refuses, naming the setting, what cannot work on this device kind
    loss_scale_optimizer(opt)      Keras' LossScaleOptimizer whose overflow check is agreed by all replicas
    Workers(s)                     this process's place among the workers; from_chief(obj) and
                                   sync_from_chief(variables): the chief's values on every worker
    xla_state(net, requested)      whether the compiled model really runs under XLA, and why not
"""
from __future__ import annotations

import contextlib
import json
import os

import keras
import numpy as np
import tensorflow as tf

from whaleid.learning import cluster
from whaleid.pipeline.files import StageError

_MULTIWORKER = None  # a process creates MultiWorkerMirroredStrategy once (it configures the runtime)
_MIRRORED: dict = {}  # device names -> MirroredStrategy (several in one process: their collective keys clash)


def make_strategy(name: str, echo=print):
    """auto: MirroredStrategy over all GPUs when there are several, else the default strategy.
    mirrored: all GPUs, or all (logical) CPU devices when there is no GPU. multiworker: TF_CONFIG
    (MultiWorkerMirroredStrategy: created before anything starts TensorFlow's runtime, which is why
    only physical devices are listed first). tpu: the TPU the resolver finds (TPU_NAME, or the
    local TPU VM)."""
    global _MULTIWORKER
    if name == "multiworker":
        if _MULTIWORKER is None:
            if "TF_CONFIG" not in os.environ:
                echo("train.strategy = multiworker but TF_CONFIG is not set: training as a single worker")
            try:
                _MULTIWORKER = tf.distribute.MultiWorkerMirroredStrategy()
            except (RuntimeError, ValueError) as e:
                raise StageError(f"train.strategy = multiworker: TensorFlow could not set up the workers "
                                 f"({' '.join(str(e).split())[:200]}). Start `whaleid train` in a fresh process "
                                 f"on every worker after `whaleid preprocess` has run (nothing may start "
                                 f"TensorFlow before the strategy).") from None
            if Workers(_MULTIWORKER).count > 1:
                patch_keras_multiworker()
        return _MULTIWORKER
    gpus = tf.config.list_physical_devices("GPU")  # (does not start the runtime)
    if name == "none" or (name == "auto" and len(gpus) <= 1):
        return tf.distribute.get_strategy()
    if name in ("auto", "mirrored"):
        kind = "GPU" if gpus else "CPU"  # no GPU: all (logical) CPU devices
        devices = tuple(d.name for d in tf.config.list_logical_devices(kind))
        if devices not in _MIRRORED:  # one per process and device set: a second one's collectives would clash
            _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
        return _MIRRORED[devices]
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
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"  # (its class is named CollectiveAllReduceStrategy)
    name = type(strategy).__name__
    return "default strategy" if name.startswith("_Default") else name


def is_tpu(strategy) -> bool:
    return isinstance(strategy, tf.distribute.TPUStrategy)


def accelerated(strategy) -> bool:
    return bool(tf.config.list_physical_devices("GPU")) or is_tpu(strategy)


def choose_precision(setting: str, strategy) -> str:
    """auto: mixed_float16 on GPUs, mixed_bfloat16 on TPUs, float32 on CPU (where both are slower)."""
    if setting != "auto":
        return setting
    if is_tpu(strategy):
        return "mixed_bfloat16"
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def check_supported(get, tpu: bool, precision: str) -> None:
    """Refuse, before anything is built or connected, the settings that cannot work on this device
    kind, naming the setting and what to set instead. TPU (XLA compiles every step; nothing else
    runs there): train.online_augment = false (the augmentation layers use
    ImageProjectiveTransformV3, which has no XLA kernel: the first step would fail), precision auto
    (mixed_bfloat16), mixed_bfloat16 or float32 (TPUs have no float16 arithmetic)."""
    if tpu:
        if get("train.online_augment"):
            raise StageError("train.strategy = tpu with train.online_augment = true: the online augmentation layers "
                             "(rotation, zoom, translation) use ImageProjectiveTransformV3, which has no XLA kernel, "
                             "so the first TPU step would fail. Set train.online_augment = false (the offline "
                             "variants of augment still apply), or train on GPUs.")
        if precision == "mixed_float16":
            raise StageError("train.strategy = tpu with train.precision = mixed_float16: TPUs compute in bfloat16; "
                             "set train.precision = auto (mixed_bfloat16) or float32.")


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


def xla_state(net, requested: bool) -> tuple[bool, str]:
    """(XLA really on for the compiled model's steps, why it is off although train.xla asked for it).
    Keras turns jit_compile off by itself when a layer has no XLA version (the online augmentation's
    RandomZoom / RandomTranslation) or when op determinism is on (CPU)."""
    on = bool(net.jit_compile)
    if on or not requested:
        return on, ""
    no_jit = sorted({type(layer).__name__ for layer in net._flatten_layers() if not getattr(layer, "supports_jit", True)})
    if no_jit:
        return False, (f"train.xla = true, but {', '.join(no_jit)} (train.online_augment) have no XLA kernels, so "
                       f"Keras compiles without XLA; set train.online_augment = false for XLA")
    from tensorflow.python.framework.config import is_op_determinism_enabled
    if is_op_determinism_enabled():
        return False, "train.xla = true, but op determinism is on (CPU), which Keras does not combine with XLA"
    return False, "train.xla = true, but Keras compiled without XLA"


# ---------------------------------------------------------------- mixed precision on several replicas

@keras.saving.register_keras_serializable(package="whaleid")
class ReplicaSafeLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras 3's LossScaleOptimizer checks the gradients for inf/NaN on each replica's own, not yet
    summed gradients and, under tf.distribute's merge call, acts on the first replica's answer
    (loss_scale_optimizer.py, _tf_apply: "Arbitrarily take `finite` from the first replica"): an
    overflow on another replica is summed into the update and reaches Adam as inf/NaN, and without a
    merge call (XLA on GPUs) replicas would take different branches. Here every replica first agrees
    (an all-reduce of the local check): if any replica overflowed, every replica's gradients are made
    NaN, so each replica sees the same answer and the step is skipped everywhere (the loss scale
    halves, as on one device)."""

    def _tf_apply(self, grads, trainable_variables=None):
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            bad_here = tf.cast(tf.logical_not(self.check_finite(grads)), tf.float32)
            bad_anywhere = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad_here) > 0
            poison = tf.where(bad_anywhere, tf.constant(float("nan")), tf.constant(0.0))
            grads = [_add(g, poison) for g in grads]
        super()._tf_apply(grads, trainable_variables)


def _add(g, x):
    if g is None:
        return None
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values + tf.cast(x, g.values.dtype), g.indices, g.dense_shape)
    return g + tf.cast(x, g.dtype)


def loss_scale_optimizer(optimizer):
    """`optimizer` wrapped for mixed_float16 (what Keras' compile would do, with the agreed check)."""
    return ReplicaSafeLossScaleOptimizer(optimizer, name="loss_scale_optimizer")


# ---------------------------------------------------------------- several workers

class Workers:
    """This process among the workers of `strategy`: count (1 unless MultiWorkerMirroredStrategy with
    TF_CONFIG naming several), chief (the one that writes), local_replicas (this worker's devices)."""

    def __init__(self, strategy):
        self.strategy = strategy
        role = cluster.parse_tf_config(os.environ.get("TF_CONFIG")) if isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy) else None
        self.role = role
        self.count = role.workers if role else 1
        self.chief = role.chief if role else True
        # position in the replica order (MultiWorkerMirroredStrategy's id in cluster): the chief first
        self.index = 0 if not role or role.task_type == "chief" else role.index + (1 if _has_chief() else 0)
        self.local_replicas = len(strategy.extended.worker_devices) if role else strategy.num_replicas_in_sync

    @property
    def several(self) -> bool:
        return self.count > 1

    def from_chief(self, obj):
        """The chief's `obj` (anything JSON can carry) on every worker; `obj` itself with one worker.
        Every worker must call it at the same point (it is a collective operation)."""
        if not self.several:
            return obj
        data = np.frombuffer(json.dumps(obj).encode() if self.chief else b"", np.uint8)
        (length,) = self.broadcast([np.array([len(data)], np.int64)])
        buf = np.zeros(int(length[0]), np.int32)
        if self.chief:
            buf[:] = data
        (got,) = self.broadcast([buf])
        return json.loads(np.asarray(got, np.uint8).tobytes().decode())

    def check_same(self, what: str, fingerprint: str) -> None:
        """Stop every worker (a StageError on each, none left waiting) unless all have the chief's
        `fingerprint` of `what` (settings and data: every worker must train on the same)."""
        if not self.several:
            return
        differs = fingerprint != self.from_chief(fingerprint)
        n = int(self.broadcast([np.array([int(differs)], np.int64)], every_worker=True)[0][0])
        if n:
            raise StageError(f"{n} worker(s) differ from the chief in {what}: every worker must train on the same "
                             f"settings and preprocessed work folder (a shared folder or a copy of the chief's)")

    def sync_from_chief(self, variables) -> None:
        """Assign the chief's values to `variables` (model and optimizer variables after the chief
        restored a checkpoint) on every worker."""
        if not self.several:
            return
        variables = list(variables)
        values = self.broadcast([np.asarray(v.numpy()) for v in variables])
        for v, a in zip(variables, values):
            v.assign(a.astype(np.asarray(v.numpy()).dtype))

    def broadcast(self, arrays: list[np.ndarray], every_worker: bool = False) -> list[np.ndarray]:
        """The chief's arrays on every worker: an all-reduce (sum) to which only the chief's first
        replica contributes its values, every other replica zeros (x + 0 = x exactly). every_worker:
        the sum of every worker's arrays instead."""
        strategy, local = self.strategy, self.local_replicas
        send = [tf.constant(np.asarray(a).astype(_wire_dtype(np.asarray(a).dtype))) for a in arrays]
        send.append(tf.constant(self.chief or every_worker))

        def step(*vals):
            ctx = tf.distribute.get_replica_context()
            vals, contributes = vals[:-1], vals[-1]
            keep = tf.logical_and(contributes, tf.equal(ctx.replica_id_in_sync_group % local, 0))
            vals = [tf.where(keep, v, tf.zeros_like(v)) for v in vals]
            out = list(vals)
            for dtype in sorted({v.dtype for v in vals}, key=str):  # (a list is packed: one dtype per all-reduce)
                group = [i for i, v in enumerate(vals) if v.dtype == dtype]
                for i, r in zip(group, ctx.all_reduce(tf.distribute.ReduceOp.SUM, [vals[i] for i in group])):
                    out[i] = r
            return out

        if getattr(self, "_broadcast", None) is None:  # one tf.function per Workers (retraced per structure only)
            self._broadcast = tf.function(lambda *t: strategy.run(step, args=t), reduce_retracing=True)
        out = self._broadcast(*send)
        return [np.asarray(strategy.experimental_local_results(o)[0]).astype(np.asarray(a).dtype)
                for o, a in zip(out, arrays)]


def _has_chief() -> bool:
    try:
        return bool(json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("chief"))
    except ValueError:
        return False


def _wire_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.dtype(np.float64) if dtype.itemsize > 4 else np.dtype(np.float32)
    return np.dtype(np.int64)  # bool, uint8, int32, uint32 (seed states), int64


_PATCHED = False


def patch_keras_multiworker() -> None:
    """Keras 3.15's fit does not run under MultiWorkerMirroredStrategy with several workers
    (tensorflow/tensorflow#72388): its step outputs (the logs, scalars) are reduced with
    strategy.reduce("MEAN", v, axis=0), which fails on a scalar ("Invalid reduction dimension 0 for
    input with 0 dimensions"), and its symbolic build reduces a whole (x, y) batch of per-replica
    values, which the strategy cannot convert. The logs are metric results, already the same on
    every replica (synchronised variables): take the first replica's ("first", as Keras does on
    TPUs); the symbolic build needs shapes only: the first local replica's batch. Applied once, only
    in a process that trains on several workers."""
    global _PATCHED
    if _PATCHED:
        return
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer
    reduce_per_replica = tf_trainer.reduce_per_replica

    def reduce_first(values, strategy, reduction):
        if reduction == "auto" and tf_trainer._collective_all_reduce_multi_worker(strategy):
            reduction = "first"
        return reduce_per_replica(values, strategy, reduction)

    symbolic_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None and self._distribute_strategy is not None:
            strategy = self.distribute_strategy
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                break
            iterator = None
        return symbolic_build(self, iterator=iterator, data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_first
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    _PATCHED = True
