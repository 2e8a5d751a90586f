"""train: the softmax classifier over the known ids (design.md §6), or an embedding head (model.head =
siamese | triplet, embedding.py), resumable epoch by epoch.

Inputs:    split/train_files.csv, split/val_files.csv (File, Image, Id), augment/images/
Artifacts: model.keras          the final model (best epoch's weights); raw 0-255 RGB in, class
                                probabilities out (softmax; the embedding heads: see embedding.py);
                                load with whaleid.model.load_model
           classes.json         the class list: classes[i] is the id of output i (embedding heads:
                                the ids trained on)
           HISTORY.pickle       {metric: [value per epoch]} as Keras' History.history (the original's)
           history.csv          the same, one row per epoch (epoch = Keras' 0-based epoch index)
           MODEL_TIME.pickle    training time in seconds (all epochs, over resumed runs too)
Also in the folder, not artifacts: logs/ (TensorBoard), and while training checkpoint.npz and
best-<epoch>.npz, deleted once the artifacts are written.

Resuming: after every epoch one atomic file, checkpoint.npz, holds every model variable (weights,
batch-norm statistics, the random state of dropout and of the online augmentation layers), every
optimizer variable (Adam's moments and step), and the state: epochs done, early stopping's best
value / wait / best epoch, the history so far, seconds spent. The best epoch's weights sit in
best-<epoch>.npz (written only when the best changes). The training order is a pure function of
(seed, epoch): tf.data shuffles each epoch with a stateless shuffle seeded by both. So a run killed
after epoch k and restarted (the stage cache sets run.resume) continues at epoch k+1 and, on CPU with
op determinism, ends with the same numbers as an uninterrupted run.

The embedding heads train on batches of P ids x K photos (batches.py, also a pure function of (seed,
epoch)); their validation is retrieval: after each epoch the validation photos are ranked against the
training photos' ids by embedding similarity, giving val_map5 (closed set) and val_top1, and early
stopping follows val_map5. train.max_minutes stops after the epoch that uses up the time budget
(counted over resumed runs too); the best epoch's weights are kept as with early stopping.

TensorFlow and Keras are imported inside functions: the CLI imports this module for `whaleid status`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from .stage import Run, StageError, atomic_path

CHECKPOINT = "checkpoint.npz"
BEST = "best-{epoch:04d}.npz"
LOGS = "logs"
ARTIFACTS = ("model.keras", "classes.json", "HISTORY.pickle", "history.csv", "MODEL_TIME.pickle")


# ---------------------------------------------------------------- the input pipeline

def _decode(path, image_size: int):
    import tensorflow as tf
    img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE")
    return tf.ensure_shape(img, [image_size, image_size, 3])


def _options():
    import tensorflow as tf
    options = tf.data.Options()
    options.deterministic = True
    # elements come from an in-memory file list, not from files tf.data could shard by
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _to_float(images, labels):
    import tensorflow as tf
    return tf.cast(images, tf.float32), labels


def train_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int, seed: int,
                  first_epoch: int, epochs: int):
    """Batches of epochs first_epoch .. epochs-1, back to back (fit with steps_per_epoch =
    steps(len(paths), batch_size)). Epoch e's order is a stateless shuffle seeded by (seed, e), so it
    does not depend on where a run started: a resumed run sees the orders an uninterrupted one would.
    Decoding is parallel, batches never straddle two epochs, the next batches are prefetched."""
    import tensorflow as tf
    auto = tf.data.AUTOTUNE
    paths_t = tf.constant(paths, tf.string)
    labels_t = tf.constant(labels, tf.int32)
    n = len(paths)

    def load(i):
        return _decode(tf.gather(paths_t, i), image_size), tf.gather(labels_t, i)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return (tf.data.Dataset.from_tensor_slices(order)
                .map(load, num_parallel_calls=auto, deterministic=True)
                .batch(batch_size))

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return ds.map(_to_float, num_parallel_calls=auto).prefetch(auto).with_options(_options())


def id_batch_dataset(paths: list[str], labels: list[int], photos: list[str], image_size: int, batch_size: int,
                     per_id: int, seed: int, first_epoch: int, epochs: int):
    """The embedding heads' batches (batches.epoch_plan: P ids x K photos, a pure function of (seed,
    epoch)) for epochs first_epoch .. epochs-1; y per photo is (label, u_pos, u_neg, u_hard)."""
    import tensorflow as tf
    from . import batches
    auto = tf.data.AUTOTUNE
    paths_t = tf.constant(paths, tf.string)
    labels_t = tf.constant(labels, tf.float32)
    labels_np, photos_np = np.asarray(labels), np.asarray(photos)
    p, k = batches.layout(batch_size, per_id)
    slots = batches.steps_per_epoch(labels_np, batch_size, per_id) * p * k

    def plan(epoch):
        return batches.epoch_plan(labels_np, photos_np, batch_size, per_id, seed, int(epoch))

    def load(i, u):
        y = tf.concat([tf.gather(labels_t, i)[None], u], axis=0)
        return _decode(tf.gather(paths_t, i), image_size), y

    def one_epoch(epoch):
        index, u = tf.numpy_function(plan, [epoch], [tf.int32, tf.float32], stateful=False)
        index.set_shape([slots])
        u.set_shape([slots, batches.UNIFORMS])
        return (tf.data.Dataset.from_tensor_slices((index, u))
                .map(load, num_parallel_calls=auto, deterministic=True)
                .batch(p * k))

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return ds.map(_to_float, num_parallel_calls=auto).prefetch(auto).with_options(_options())


def eval_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int):
    import tensorflow as tf
    auto = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    ds = ds.map(lambda p, y: (_decode(p, image_size), y), num_parallel_calls=auto, deterministic=True)
    return ds.batch(batch_size).map(_to_float, num_parallel_calls=auto).prefetch(auto).with_options(_options())


def steps(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


# ---------------------------------------------------------------- scale: strategy, precision, determinism

def make_strategy(name: str, echo=print):
    """auto: MirroredStrategy over all GPUs when there are several, else the default strategy.
    mirrored: all GPUs, or all (logical) CPU devices when there is no GPU. multiworker: TF_CONFIG.
    tpu: the TPU the resolver finds (TPU_NAME, or the local TPU VM)."""
    import tensorflow as tf
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


def _strategy_name(strategy) -> str:
    name = type(strategy).__name__
    return "default strategy" if name.startswith("_Default") else name


def _accelerated(strategy) -> bool:
    import tensorflow as tf
    return bool(tf.config.list_logical_devices("GPU")) or isinstance(strategy, tf.distribute.TPUStrategy)


def choose_precision(setting: str, strategy) -> str:
    """auto: mixed_float16 on GPUs, mixed_bfloat16 on TPUs, float32 on CPU (where both are slower)."""
    import tensorflow as tf
    if setting != "auto":
        return setting
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "float32"


def seed_everything(seed: int, deterministic_ops: bool) -> None:
    """Python, NumPy, TF and Keras seeds (and Keras' global state: layer names, the global seed
    generator). Op determinism where it is cheap (CPU): on GPUs some kernels have no deterministic
    version and it costs speed there."""
    import keras
    import tensorflow as tf
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------- checkpoint: one atomic file per epoch

def _save_arrays(path: Path, arrays: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def _numpy(v):
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v)


class Checkpoint:
    """checkpoint.npz: model variables m*, optimizer variables o*, the JSON state; best-<epoch>.npz:
    the best epoch's weights (w*). The state names the best file it goes with, so a kill between the
    two writes never pairs a state with the wrong best weights."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / CHECKPOINT
        self.best_file = None  # the best file the last state saved or loaded names

    def save(self, model, state: dict, best_weights, best_epoch: int | None) -> None:
        best = None
        if best_weights is not None and best_epoch is not None:
            best = BEST.format(epoch=best_epoch)
            if best != self.best_file:  # (a file of that name left by a killed run is rewritten)
                _save_arrays(self.folder / best, {f"w{i:05d}": _numpy(w) for i, w in enumerate(best_weights)})
        arrays = {f"m{i:05d}": _numpy(v) for i, v in enumerate(model.variables)}
        arrays.update({f"o{i:05d}": _numpy(v) for i, v in enumerate(model.optimizer.variables)})
        arrays["state"] = np.array(json.dumps({**state, "best_file": best}))
        _save_arrays(self.path, arrays)
        self.best_file = best
        for old in self.folder.glob("best-*.npz"):
            if old.name != best:
                old.unlink()

    def load(self, model) -> tuple[dict, list | None] | None:
        """Restore model and optimizer variables; (state, best weights), or None (no usable checkpoint)."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                state = json.loads(str(z["state"]))
                m = [z[k] for k in sorted(k for k in z.files if k.startswith("m"))]
                o = [z[k] for k in sorted(k for k in z.files if k.startswith("o"))]
            best = None
            if state.get("best_file"):
                with np.load(self.folder / state["best_file"], allow_pickle=False) as z:
                    best = [z[k] for k in sorted(z.files)]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # unreadable (a disk problem: the file itself is written atomically)
        targets = [(model.variables, m), (model.optimizer.variables, o)]
        for variables, values in targets:
            if len(variables) != len(values) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
                return None  # another model (e.g. a different Keras version built it differently)
        for variables, values in targets:
            for v, a in zip(variables, values):
                v.assign(a)
        self.best_file = state.get("best_file")
        return state, best

    def remove(self) -> None:
        for p in [self.path, *self.folder.glob("best-*.npz")]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# ---------------------------------------------------------------- callbacks

def make_callbacks(run: Run, checkpoint: Checkpoint, monitor: str, patience: int, epochs: int,
                   n_train: int, state: dict | None, best_weights, validation=None, max_minutes: float = 0.0):
    """[validation (the embedding heads' retrieval, which adds val_* to the logs), early stopping
    (resumable), per-epoch checkpoint + time budget + one progress line, CSV log, TensorBoard]."""
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """Keras' EarlyStopping (max of `monitor`, restore best weights) whose state survives a kill."""

        def __init__(self, restored: dict | None, restored_weights):
            super().__init__(monitor=monitor, mode="max", patience=patience, restore_best_weights=True)
            self.restored, self.restored_weights = restored, restored_weights
            self._restore()

        def _restore(self):
            if self.restored:
                self.best, self.wait = self.restored["best"], self.restored["wait"]
                self.best_epoch, self.best_weights = self.restored["best_epoch"], self.restored_weights

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)  # resets the state ...
            self._restore()               # ... to the checkpoint's

        def state(self) -> dict:
            return {"best": None if self.best is None else float(self.best), "wait": int(self.wait),
                    "best_epoch": int(self.best_epoch)}

    stopper = ResumableEarlyStopping(state and state["early_stopping"], best_weights)

    class EpochCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows = list(state["history"]) if state else []
            self.seconds = float(state["seconds"]) if state else 0.0
            self.rates: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = self.t_val = time.perf_counter()
            self.validating = False

        def on_test_begin(self, logs=None):
            self.t_val, self.validating = time.perf_counter(), True

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            train_seconds = (self.t_val if self.validating else now) - self.t0
            if validation is not None:
                train_seconds -= validation.seconds
            self.rates.append(n_train / max(train_seconds, 1e-9))
            self.seconds += now - self.t0
            out_of_time = bool(max_minutes) and self.seconds >= 60 * max_minutes and epoch + 1 < epochs
            if out_of_time:
                self.model.stop_training = True
            logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
            order = sorted(logs, key=lambda k: (k.startswith("val_"), "accuracy" in k, k))
            self.rows.append({"epoch": epoch, **logs})
            st = {"epochs_done": epoch + 1, "early_stopping": stopper.state(),
                  "stopped": bool(self.model.stop_training), "history": self.rows, "seconds": self.seconds}
            checkpoint.save(self.model, st, stopper.best_weights, stopper.best_epoch)
            shown = " ".join(f"{k} {logs[k]:.4f}" for k in order)
            run.echo(f"epoch {epoch + 1}/{epochs}: {shown} | best {monitor} {stopper.best:.4f} at epoch "
                     f"{stopper.best_epoch + 1} | {now - self.t0:.1f}s, {self.rates[-1]:.0f} img/s | checkpoint saved")
            if out_of_time:
                run.echo(f"time budget: {self.seconds / 60:.1f} of train.max_minutes = {max_minutes:g} minutes "
                         f"used; stopping with the best epoch's weights")
            elif self.model.stop_training:
                run.echo(f"early stopping: {monitor} has not improved for {patience} epochs")

    progress = EpochCheckpoint()
    csv_log = keras.callbacks.CSVLogger(str(run.path("history.csv")), append=state is not None)
    callbacks = ([validation] if validation is not None else []) + [stopper, progress, csv_log]
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run.path(LOGS)), write_graph=False,
                                                     profile_batch=0, update_freq="epoch"))
    else:
        run.echo("the tensorboard package is not installed: no TensorBoard logs (pip install tensorboard)")
    return stopper, progress, callbacks


def retrieval_validation(train: pd.DataFrame, val: pd.DataFrame, head: str, image_size: int, batch_size: int):
    """A callback for the embedding heads: after each epoch, embed the training photos (their first
    file, the original) and the validation photos, rank the training ids for each validation photo by
    its best-matching photo, and add val_map5 and val_top1 to the epoch's logs. Closed set: every
    validation id has training photos (read_inputs drops the others)."""
    import keras
    from .embedding import Embedder
    from .retrieval import GalleryScorer
    from .submission import map5
    gallery = train.drop_duplicates("Image")
    paths = list(gallery.path) + list(val.path)

    class RetrievalValidation(keras.callbacks.Callback):
        seconds = 0.0

        def on_train_begin(self, logs=None):
            self.embedder = Embedder(self.model, head)  # shares the model's layers: current weights

        def on_epoch_end(self, epoch, logs=None):
            t0 = time.perf_counter()
            vectors = self.embedder.encode_files(paths, image_size, batch_size, progress=False)
            scorer = GalleryScorer(self.embedder.encode, self.embedder.similarity, vectors[:len(gallery)], gallery.Id)
            top = np.argsort(-scorer.scores(vectors[len(gallery):]), axis=1, kind="stable")[:, :5]
            ranked = [[scorer.classes[c] for c in row] for row in top]
            if logs is not None:
                logs["val_map5"] = map5(val.Id, ranked)
                logs["val_top1"] = float(np.mean([r[0] == t for r, t in zip(ranked, val.Id)]))
            self.seconds = time.perf_counter() - t0

    return RetrievalValidation()


# ---------------------------------------------------------------- the stage

def _history(rows: list[dict]) -> tuple[dict, pd.DataFrame]:
    keys = sorted({k for r in rows for k in r} - {"epoch"})
    table = pd.DataFrame([{"epoch": r["epoch"], **{k: r.get(k) for k in keys}} for r in rows],
                         columns=["epoch", *keys])
    return {k: [r.get(k) for r in rows] for k in keys}, table


@contextlib.contextmanager
def _dtype_policy(name: str):
    import keras
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def _save_model(model, path: Path) -> None:
    """model.keras without the optimizer (a third of the size; prediction does not need it), atomically."""
    import keras
    inference = keras.Model(model.inputs, model.outputs, name=model.name)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        inference.save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def learning_rate(cfg_get, steps_per_epoch: int | None):
    """train.learning_rate, constant, or with train.lr_schedule = cosine: decayed along a half cosine
    to 0 over the whole run (epochs x steps per epoch), after one epoch of linear warm-up from 0.
    The schedule is a function of the optimizer's step count, which the checkpoint saves: a resumed
    run continues on the same curve."""
    import keras
    lr, schedule = cfg_get("train.learning_rate"), cfg_get("train.lr_schedule")
    if schedule == "constant" or steps_per_epoch is None:
        return lr
    epochs = cfg_get("train.epochs")
    warmup = steps_per_epoch if epochs > 1 else 0
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else lr, decay_steps=max(1, epochs * steps_per_epoch - warmup),
        warmup_target=lr if warmup else None, warmup_steps=warmup)


def compiled_model(cfg, n_classes: int, steps_per_epoch: int | None = None):
    """models.build_model with the stage's Adam, loss, metrics and jit setting, optimizer built (so
    its variables exist for a checkpoint to fill). `cfg`: a Run or a settings dict; steps_per_epoch
    sizes a learning-rate schedule (without it the rate is constant). Call it inside the strategy's
    scope and the dtype policy."""
    import keras
    from . import model as models
    from .config import get as setting
    get = cfg.setting if hasattr(cfg, "setting") else (lambda key: setting(cfg, key))
    net = models.build_model(cfg, n_classes)
    decay = get("train.weight_decay")
    optimizer = keras.optimizers.Adam(learning_rate(get, steps_per_epoch), weight_decay=decay or None)
    head = get("model.head")
    extra = {"margin": get("train.margin"), "hard_negatives": get("train.hard_negatives")} if head != "softmax" else {}
    net.compile(optimizer=optimizer,
                loss=models.loss(head, get("train.label_smoothing"), **extra),
                metrics=models.metrics(get("model.head"), n_classes), jit_compile=bool(get("train.xla")))
    net.optimizer.build(net.trainable_variables)
    return net


def read_inputs(run: Run) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Training and validation files (with a class index `y` and a full `path`) and the class list."""
    train = run.read_csv("split", "train_files.csv")
    val = run.read_csv("split", "val_files.csv")
    images = run.upstream("augment", "images")
    if train.empty:
        raise StageError("split/train_files.csv lists no training images: nothing to train on")
    classes = sorted(train.Id.unique())
    if len(classes) < 2:
        raise StageError(f"the training set has {len(classes)} id: a classifier needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    unknown = ~val.Id.isin(index)
    if unknown.any():
        run.echo(f"{int(unknown.sum())} validation files of ids without training images are left out")
        val = val[~unknown]
    for df in (train, val):
        df["y"] = df.Id.map(index).astype("int32")
        df["path"] = [str(images / f) for f in df.File]
    missing = [p for p in pd.concat([train.path, val.path]) if not os.path.exists(p)]
    if missing:
        raise StageError(f"{len(missing)} images listed by split are missing from {images} (e.g. {missing[0]}); "
                         f"rerun with --force augment")
    from PIL import Image
    with Image.open(train.path.iloc[0]) as im:
        size = run.setting("run.image_size")
        if im.size != (size, size):
            raise StageError(f"{train.path.iloc[0]} is {im.size[0]}x{im.size[1]}, not run.image_size = {size}: "
                             f"rerun with --force augment")
    return train.reset_index(drop=True), val.reset_index(drop=True), classes


def run(run: Run) -> dict:
    train, val, classes = read_inputs(run)
    seed, size = run.setting("run.seed"), run.setting("run.image_size")
    epochs, batch = run.setting("train.epochs"), run.setting("train.batch_size")
    if epochs < 1 or batch < 1:
        raise StageError(f"train.epochs = {epochs}, train.batch_size = {batch}: both must be at least 1")
    head, max_minutes = run.setting("model.head"), run.setting("train.max_minutes")
    if max_minutes < 0:
        raise StageError(f"train.max_minutes = {max_minutes}: expected 0 (no limit) or a positive number of minutes")
    embedding = head != "softmax"
    if embedding:
        from . import batches
        per_id = run.setting("train.photos_per_id")
        try:
            ids_per_batch, _ = batches.layout(batch, per_id)
        except ValueError as e:
            raise StageError(str(e)) from None
        batch = ids_per_batch * per_id
        n_steps = batches.steps_per_epoch(train.y, batch, per_id)
        layout = f"{head} head, batches of {ids_per_batch} ids x {per_id} photos"
    else:
        n_steps, layout = steps(len(train), batch), "softmax head"
    strategy = make_strategy(run.setting("train.strategy"), run.echo)
    precision = choose_precision(run.setting("train.precision"), strategy)
    deterministic = not _accelerated(strategy)
    seed_everything(seed, deterministic)
    monitor = ("val_map5" if embedding else "val_accuracy") if len(val) else "accuracy"
    run.echo(f"{len(classes)} classes, {len(train)} training images, {len(val)} validation images; "
             f"{run.setting('model.backbone')} ({run.setting('model.weights')} weights) at {size} px, {layout}, "
             f"batch {batch}, up to {epochs} epochs; {_strategy_name(strategy)} with "
             f"{strategy.num_replicas_in_sync} replica(s), {precision}, "
             f"xla {'on' if run.setting('train.xla') else 'off'}, op determinism {'on' if deterministic else 'off'}")
    if not len(val):
        run.echo("no validation data: early stopping monitors training accuracy instead")

    checkpoint = Checkpoint(run.dir)
    with _dtype_policy(precision):
        with strategy.scope():
            net = compiled_model(run, len(classes), n_steps)
        restored = checkpoint.load(net) if run.resume else None
        if restored is None:
            if run.resume:
                run.echo("resuming, but no usable checkpoint was left: starting at epoch 1")
            checkpoint.remove()
        state, best_weights = restored if restored else (None, None)
        start = state["epochs_done"] if state else 0
        if state:
            run.write_csv("history.csv", _history(state["history"])[1])  # drop rows logged after the checkpoint
            run.echo(f"resuming from the checkpoint of epoch {start}: continuing at epoch {start + 1} of {epochs}")

        validation = None
        if embedding and len(val):
            validation = retrieval_validation(train, val, head, size, batch)
        stopper, progress, callbacks = make_callbacks(run, checkpoint, monitor, run.setting("train.patience"),
                                                      epochs, n_steps * batch if embedding else len(train), state,
                                                      best_weights, validation, max_minutes)
        if start < epochs and not (state and state["stopped"]):
            if embedding:
                fit_data = id_batch_dataset(list(train.path), list(train.y), list(train.Image), size, batch,
                                            per_id, seed, start, epochs)
                val_data = None
            else:
                fit_data = train_dataset(list(train.path), list(train.y), size, batch, seed, start, epochs)
                val_data = eval_dataset(list(val.path), list(val.y), size, batch) if len(val) else None
            net.fit(fit_data, epochs=epochs, initial_epoch=start, steps_per_epoch=n_steps,
                    validation_data=val_data, callbacks=callbacks, shuffle=False,
                    verbose=1 if run.session.progress and sys.stdout.isatty() else 0)
        elif best_weights is not None:
            net.set_weights(best_weights)  # finished before the kill: only the artifacts were missing

        rows, seconds = progress.rows, progress.seconds
        best_epoch = stopper.best_epoch + 1
        history, table = _history(rows)
        _save_model(net, run.path("model.keras"))
    run.write_json("classes.json", classes)
    run.write_pickle("HISTORY.pickle", history)
    run.write_csv("history.csv", table)
    run.write_pickle("MODEL_TIME.pickle", seconds)
    checkpoint.remove()
    rates = progress.rates[1:] or progress.rates  # the first epoch of a process includes tracing
    best = history[monitor][best_epoch - 1]
    run.echo(f"best {monitor} {best:.4f} at epoch {best_epoch} of {len(rows)}; model in {run.path('model.keras')}")
    counts = {"epochs": len(rows), "best_epoch": best_epoch, f"best_{monitor}": round(best, 4),
              "classes": len(classes), "replicas": strategy.num_replicas_in_sync}
    if rates:
        counts["images_per_second"] = round(float(np.median(rates)), 1)
    if state:
        counts["resumed_from_epoch"] = start
    return counts
