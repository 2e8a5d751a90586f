"""train: the model over the known ids, with the configured head (softmax classifier, design.md §6,
or a metric-learning head: whaleid/learning/heads/), resumable epoch by epoch.

Inputs:    split/train_files.csv, split/val_files.csv (File, Image, Id), augment/images/
Artifacts: model.keras          the final model (best epoch's weights); raw 0-255 RGB in; its output
                                layer "head" records the head and its settings; load with
                                whaleid.learning.model.load_model
           classes.json         the class list: classes[i] is the id of output i (retrieval heads:
                                the ids trained on)
           HISTORY.pickle       {metric: [value per epoch]} as Keras' History.history (the original's)
           history.csv          the same, one row per epoch (epoch = Keras' 0-based epoch index)
           MODEL_TIME.pickle    training time in seconds (all epochs, over resumed runs too)
Also in the folder, not artifacts: logs/ (TensorBoard), and while training checkpoint.npz and
best-<epoch>.npz (checkpoint.py), deleted once the artifacts are written.

The training order is a pure function of (seed, epoch) (inputs.py), so a run killed after epoch k
and restarted (the stage cache sets run.resume) continues at epoch k+1 and, on CPU with op
determinism, ends with the same numbers as an uninterrupted run; the checkpoint is written every
train.checkpoint_every epochs (or train.checkpoint_minutes), and restores under another precision or
device layout (checkpoint.py). Heads validated by retrieval (heads/base.py) rank the validation
photos against the training photos and early stopping follows val_map5; the others (softmax) get
val_loss and their metrics as a one-device evaluate gives them; both every train.validate_every
epochs, on photos decoded once (callbacks.py). train.max_minutes stops after the epoch that uses up
the time budget (counted over resumed runs too); the best epoch's weights are kept as with early
stopping.

Devices (devices.py): the strategy is created first; several replicas get equal slices of every
global batch (train.batch_size, or per replica with train.batch_per_replica; embedding heads: whole
ids per replica); the saved model computes in float32 whatever precision trained it. Several workers
(train.strategy = multiworker, cluster.py): each reads only its replicas' files, the chief restores
and writes, and every worker takes the chief's resume state, validation results and stop decisions.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from typing import NamedTuple

import keras
import numpy as np
import pandas as pd
from PIL import Image

from whaleid.data.tables import read_sides
from whaleid.preprocess import augment
from whaleid.learning import devices, heads, inputs, model as models
from whaleid.learning.callbacks import ClassifierValidation, EpochCheckpoint, ResumableEarlyStopping, RetrievalValidation, StepProgress
from whaleid.learning.checkpoint import Checkpoint
from whaleid.learning.phases import Phase, compile_for, phase_of, phases
from whaleid.pipeline.stage import Run, StageError

LOGS = "logs"


def run(run: Run) -> dict:
    train, val, classes = read_inputs(run)
    head = heads.from_settings(run.setting)
    head.prepare(np.bincount(train.y, minlength=len(classes)))
    where = Placement.choose(run, fingerprint(run, train, val))  # before anything starts TF's runtime
    checkpoint = Checkpoint(run.dir, writes=where.workers.chief)
    with devices.dtype_policy(where.precision):
        data = TrainingData(run, head, train, where)
        built = build_and_restore(run, head, classes, where, data, len(val), checkpoint)
        loop = TrainingLoop(run, head, train, val, len(classes), where, data, built, checkpoint)
        loop.fit(built.net)
        if where.workers.chief:
            save_model(inference_model(built.net, run.setting, head, len(classes)), run.path("model.keras"))
    return write_outputs(run, loop, classes, where, built)


class Built(NamedTuple):
    net: object            # the model, compiled for `phase`
    phase: "Phase"
    state: dict | None     # the resumed checkpoint's state (None: a fresh start)
    best_weights: list | None
    xla: bool


class Placement:
    """Where training runs: the strategy (created first: a multi-worker strategy must come before
    anything starts TF's runtime), this worker's part of each batch, the precision, op determinism."""

    def __init__(self, strategy, precision: str):
        self.strategy, self.precision = strategy, precision
        self.workers = devices.Workers(strategy)
        self.replicas = strategy.num_replicas_in_sync
        self.deterministic = not devices.accelerated(strategy)
        w = self.workers
        self.shard = inputs.Shard(w.index * w.local_replicas, w.local_replicas, self.replicas) if w.several else None

    @classmethod
    def choose(cls, run: Run, fingerprint_: str) -> "Placement":
        devices.check_supported(run.setting, run.setting("train.strategy") == "tpu", run.setting("train.precision"))
        strategy = devices.make_strategy(run.setting("train.strategy"), run.echo)
        where = cls(strategy, devices.choose_precision(run.setting("train.precision"), strategy))
        devices.seed_everything(run.setting("run.seed"), where.deterministic)
        where.workers.check_same("the train stage's settings and inputs", fingerprint_)
        return where

    def describe(self) -> str:
        text = f"{devices.strategy_name(self.strategy)} with {self.replicas} replica(s)"
        w = self.workers
        if w.several:
            text += f" on {w.count} workers (this one: {w.role.task_type} {w.role.index}" + (", the chief)" if w.chief else ")")
        return text


class TrainingData:
    """The whole run's batches: epoch e's order depends on (seed, e) only, so a resumed run continues
    on the same sequence (inputs.py)."""

    def __init__(self, run: Run, head, train: pd.DataFrame, where: Placement):
        self.run, self.head, self.train, self.where = run, head, train, where
        try:
            self.plan = self.from_epoch(0)
        except ValueError as e:  # a batch too small for the head's layout or the replicas
            raise StageError(str(e)) from None

    def from_epoch(self, first_epoch: int):
        get, t, w = self.run.setting, self.train, self.where
        return inputs.training_batches(self.head, list(t.path), list(t.y), list(t.Image), get("run.image_size"),
                                       get("train.batch_size"), get("train.photos_per_id"), get("run.seed"),
                                       first_epoch, get("train.epochs"), w.replicas, get("train.batch_per_replica"),
                                       w.shard, list(t.Encounter) if "Encounter" in t.columns else None)

    def dataset(self, first_epoch: int):
        if self.where.shard is None:  # one worker: Keras cuts each global batch into the replicas' slices
            return self.from_epoch(first_epoch).dataset
        return self.where.strategy.distribute_datasets_from_function(lambda _: self.from_epoch(first_epoch).dataset)


def build_and_restore(run: Run, head, classes: list[str], where: Placement, data: TrainingData, n_val: int,
                      checkpoint: Checkpoint) -> Built:
    """The model built, then the last checkpoint restored when resuming (compiled for the phase it was saved in);
    several workers: the chief restores and every worker takes its values."""
    epochs, w = run.setting("train.epochs"), where.workers
    with where.strategy.scope():
        net = models.build_model(run.setting, len(classes), head)
    done = w.from_chief(checkpoint.epochs_done() if run.resume and w.chief else None)
    phase = phase_of(phases(run.setting, epochs), done - 1 if done else 0)
    with where.strategy.scope():
        compile_for(net, run.setting, head, len(classes), phase, data.plan.steps)
    xla, why_not = devices.xla_state(net, run.setting("train.xla"))
    run.echo(f"{len(classes)} classes, {len(data.train)} training images, {n_val} validation images; "
             f"{run.setting('model.backbone')} ({run.setting('model.weights')} weights) at {run.setting('run.image_size')} "
             f"px, {head.name} head, {data.plan.layout}, up to {epochs} epochs; {where.describe()}, {where.precision}, "
             f"xla {'on' if xla else 'off'}, op determinism {'on' if where.deterministic else 'off'}")
    if why_not:
        run.echo(why_not)
    if not n_val:
        run.echo("no validation data: early stopping monitors training accuracy instead")
    restored = checkpoint.load(net) if run.resume and w.chief else None
    if restored is None and w.chief:
        if run.resume:
            run.echo("resuming, but no usable checkpoint was left: starting at epoch 1")
        checkpoint.remove()
    state, best_weights = restored if restored else (None, None)
    if w.several:
        state = w.from_chief(state)
        w.sync_from_chief(list(net.variables) + list(net.optimizer.variables))
        if state and not w.chief:
            best_weights = net.get_weights()  # a stand-in (this worker writes no model), so that early
            #                                   stopping keeps the chief's best epoch as the chief does
    if state:
        run.write_csv("history.csv", history_table(state["history"])[1])  # drop rows logged after it
        run.echo(f"resuming from the checkpoint of epoch {state['epochs_done']}: continuing at epoch "
                 f"{state['epochs_done'] + 1} of {epochs}")
    return Built(net, phase, state, best_weights, xla)


class TrainingLoop:
    """The fit, phase by phase (fine-tuning: the backbone frozen, then all of it), with validation,
    early stopping, checkpoints and progress as callbacks (callbacks.py)."""

    def __init__(self, run: Run, head, train, val, n_classes: int, where: Placement, data: TrainingData, built: Built,
                 checkpoint: Checkpoint):
        self.run, self.head, self.n_classes, self.where, self.data = run, head, n_classes, where, data
        self.state, self.best_weights, self.compiled = built.state, built.best_weights, built.phase
        state = built.state
        self.epochs = run.setting("train.epochs")
        self.monitor = head.monitor if len(val) else "accuracy"
        self.checkpoint = checkpoint
        self.validation = validation_for(run, head, train, val, n_classes, data.plan, where)
        self.stopper = ResumableEarlyStopping(self.monitor, run.setting("train.patience"),
                                              state and state["early_stopping"], built.best_weights)
        self.progress = EpochCheckpoint(self.checkpoint, self.stopper, run.echo, self.epochs, data.plan.images, state,
                                        self.validation, run.setting("train.max_minutes"),
                                        run.setting("train.checkpoint_every"), run.setting("train.checkpoint_minutes"),
                                        where.workers)
        self.bar = StepProgress(data.plan.steps, data.plan.size, self.epochs,
                                enabled=run.session.progress and where.workers.chief)
        self.start = state["epochs_done"] if state else 0

    def fit(self, net) -> None:
        run, state, schedule = self.run, self.state, phases(self.run.setting, self.epochs)
        current = self.compiled
        todo = [p for p in schedule if p.end > self.start] if not (state and state["stopped"]) else []
        for i, phase in enumerate(todo):
            if phase != current:
                with self.where.strategy.scope():
                    compile_for(net, run.setting, self.head, self.n_classes, phase, self.data.plan.steps)
                current = phase
            first = max(self.start, phase.first)
            if len(schedule) > 1:
                run.echo(f"epochs {first + 1}-{phase.end}: {phase.name}, learning rate {phase.learning_rate:g}")
            self.stopper.carry_over(last_fit=i == len(todo) - 1)
            callbacks = [c for c in (self.validation, self.stopper, self.progress, self.bar) if c is not None]
            callbacks += logs(run, state or i > 0, tensorboard=self.where.workers.chief)
            net.fit(self.data.dataset(first), epochs=phase.end, initial_epoch=first, steps_per_epoch=self.data.plan.steps,
                    callbacks=callbacks, shuffle=False, verbose=0)
            if net.stop_training:
                break
        if not todo and self.best_weights is not None:
            net.set_weights(self.best_weights)  # finished before the kill: only the artifacts were missing


def validation_for(run: Run, head, train, val, n_classes: int, plan, where: Placement):
    """Heads validated by retrieval rank the validation photos against the training photos (val_map5);
    the others get val_loss and their metrics; none without validation photos."""
    size, every, epochs = run.setting("run.image_size"), run.setting("train.validate_every"), run.setting("train.epochs")
    if not len(val):
        return None
    if head.retrieval_validation:
        gallery = train[~train.Id.str.endswith(augment.FLIP)].drop_duplicates("Image")
        return RetrievalValidation(gallery.path, gallery.Id, val.path, val.Id, size, eval_batch(plan, where.replicas),
                                   every=every, epochs=epochs, workers=where.workers)
    return ClassifierValidation(val.path, val.y, size, eval_batch(plan, where.replicas), head, n_classes,
                                every=every, epochs=epochs, workers=where.workers)


def write_outputs(run: Run, loop: TrainingLoop, classes: list[str], where: Placement, built: Built) -> dict:
    """The artifacts besides the model, and the counts the manifest records."""
    history, table = history_table(loop.progress.rows)
    run.write_json("classes.json", classes)
    run.write_pickle("HISTORY.pickle", history)
    run.write_csv("history.csv", table)
    run.write_pickle("MODEL_TIME.pickle", loop.progress.seconds)
    loop.checkpoint.remove()
    best_epoch, monitor = loop.stopper.best_epoch + 1, loop.monitor
    best = history[monitor][best_epoch - 1]
    run.echo(f"best {monitor} {best:.4f} at epoch {best_epoch} of {len(loop.progress.rows)}; model in {run.path('model.keras')}")
    counts = {"epochs": len(loop.progress.rows), "best_epoch": best_epoch, f"best_{monitor}": round(best, 4),
              "classes": len(classes), "training_files": len(loop.data.train), "replicas": where.replicas,
              "precision": where.precision, "xla": built.xla}
    if where.workers.several:
        counts["workers"] = where.workers.count
    rates = loop.progress.rates[1:] or loop.progress.rates  # the first epoch of a process includes tracing
    if rates:
        counts["images_per_second"] = round(float(np.median(rates)), 1)
    if built.state:
        counts["resumed_from_epoch"] = loop.start
    return counts


def fingerprint(run: Run, train: pd.DataFrame, val: pd.DataFrame) -> str:
    """What every worker of a multi-worker training must share: the stage's settings and files."""
    settings = {k: v for k, v in run.session.settings_of(run.stage).items() if k != "train.strategy"}
    text = json.dumps([settings, list(train.File), list(train.Id), list(val.File), list(val.Id)], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def eval_batch(plan, replicas: int) -> int:
    """Validation's batch (one device): a replica's share of the training batch."""
    return max(1, plan.size // replicas)


SIDE_CLASS = "@"  # train.side_classes: <id>@left and <id>@right are trained as two classes


def side_classes(run: Run, table: pd.DataFrame | None) -> pd.DataFrame | None:
    """train.side_classes: a photo of known side is learnt as <id>@<side> (an animal's left and right
    flanks carry different marks: one class centre for both must average them). Scoring compares
    photos with gallery photos of their true ids, so nothing else changes."""
    if table is None or not run.setting("train.side_classes"):
        return table
    sides = read_sides(run.data)
    side = table.Image.map(sides)
    return table.assign(Id=[i if not isinstance(s, str) else f"{i}{SIDE_CLASS}{s}" for i, s in zip(table.Id, side)])


def background_copies(run: Run) -> pd.DataFrame | None:
    """train.background: the background stage's neutralised copies of the training files (File, Image,
    Id, ...), with flip_ids' mirrored ids as their originals have them; None when off."""
    if run.setting("train.background") == "none":
        return None
    path = run.session.dir("background") / "background_files.csv"
    if not path.is_file():
        raise StageError(f"{path} is missing: the background stage has not run (train.background runs it)")
    copies = pd.read_csv(path, dtype=str, keep_default_na=False)
    if run.setting("train.flip_ids"):
        final = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
        variant_of = {"bg-" + f: v for f, v in zip(final.File, final.variant)}
        copies = augment.flip_ids(copies, variant_of)
    return copies


def read_inputs(run: Run) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Training and validation files (with a class index `y` and a full `path`) and the class list."""
    train = run.read_csv("split", "train_files.csv")
    val = run.read_csv("split", "val_files.csv")
    images = run.upstream("augment", "images")
    if train.empty:
        raise StageError("split/train_files.csv lists no training images: nothing to train on")
    copies = background_copies(run)
    train, val, copies = (side_classes(run, t) for t in (train, val, copies))
    if run.setting("train.flip_ids"):
        final = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
        variant_of = dict(zip(final.File, final.variant))
        train, val = augment.flip_ids(train, variant_of), augment.flip_ids(val, variant_of)
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
    if copies is not None:  # training only: validation and every scored photo keep their background
        copies = copies.assign(y=copies.Id.map(index).astype("int32"),
                               path=[str(run.session.dir("background") / "images" / f) for f in copies.File])
        train = pd.concat([train, copies[train.columns]], ignore_index=True)
    missing = [p for p in pd.concat([train.path, val.path]) if not os.path.exists(p)]
    if missing:
        raise StageError(f"{len(missing)} images listed by split are missing from {images} (e.g. {missing[0]}); "
                         f"rerun with --force augment")
    with Image.open(train.path.iloc[0]) as im:
        size = run.setting("run.image_size")
        if im.size != (size, size):
            raise StageError(f"{train.path.iloc[0]} is {im.size[0]}x{im.size[1]}, not run.image_size = {size}: "
                             f"rerun with --force augment")
    return train.reset_index(drop=True), val.reset_index(drop=True), classes


def logs(run: Run, append: bool, tensorboard: bool = True) -> list:
    """history.csv as it grows (appended to by a resumed run or a later phase), and TensorBoard logs
    when tensorboard is installed."""
    out = [keras.callbacks.CSVLogger(str(run.path("history.csv")), append=bool(append))]
    if not tensorboard:  # (a multi-worker training's other workers: the chief writes them)
        return out
    if importlib.util.find_spec("tensorboard") is not None:
        out.append(keras.callbacks.TensorBoard(log_dir=str(run.path(LOGS)), write_graph=False,
                                               profile_batch=0, update_freq="epoch"))
    else:
        run.echo("the tensorboard package is not installed: no TensorBoard logs (pip install tensorboard)")
    return out


def history_table(rows: list[dict]) -> tuple[dict, pd.DataFrame]:
    keys = sorted({k for r in rows for k in r} - {"epoch"})
    table = pd.DataFrame([{"epoch": r["epoch"], **{k: r.get(k) for k in keys}} for r in rows],
                         columns=["epoch", *keys])
    return {k: [r.get(k) for r in rows] for k in keys}, table


def inference_model(net, get, head, n_classes: int):
    """The trained model without its optimizer, computing in float32: a model trained in mixed
    precision is rebuilt under the float32 policy with the same weights (its variables are float32
    already), so evaluate and predict on a CPU-only machine do not run float16 arithmetic, which is
    slow there, and give the same numbers on any device."""
    if net.dtype_policy.name == "float32":
        return keras.Model(net.inputs, net.outputs, name=net.name)
    without_download = lambda key: "none" if key == "model.weights" else get(key)  # noqa: E731
    with devices.dtype_policy("float32"):
        f32 = models.build_model(without_download, n_classes, head)
    f32.set_weights(net.get_weights())
    return f32


def save_model(model, path) -> None:
    """model.keras without the optimizer (a third of the size; prediction does not need it), atomically."""
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
