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
import warnings
from typing import NamedTuple

import keras
import numpy as np
import pandas as pd
from PIL import Image

from ..preprocess import augment
from . import devices, heads, inputs, model as models
from .callbacks import (ClassifierValidation, EpochCheckpoint, ResumableEarlyStopping, RetrievalValidation,
                        StepProgress)
from .checkpoint import Checkpoint
from ..pipeline.stage import Run, StageError

LOGS = "logs"


def run(run: Run) -> dict:
    train, val, classes = read_inputs(run)
    head = heads.from_settings(run.setting)
    head.prepare(np.bincount(train.y, minlength=len(classes)))
    seed, size = run.setting("run.seed"), run.setting("run.image_size")
    epochs, patience = run.setting("train.epochs"), run.setting("train.patience")

    # where: the strategy first (a multi-worker strategy must come before anything starts TF's runtime)
    devices.check_supported(run.setting, run.setting("train.strategy") == "tpu", run.setting("train.precision"))
    strategy = devices.make_strategy(run.setting("train.strategy"), run.echo)
    workers = devices.Workers(strategy)
    precision = devices.choose_precision(run.setting("train.precision"), strategy)
    deterministic = not devices.accelerated(strategy)
    devices.seed_everything(seed, deterministic)
    replicas = strategy.num_replicas_in_sync
    workers.check_same("the train stage's settings and inputs", fingerprint(run, train, val))
    shard = inputs.Shard(workers.index * workers.local_replicas, workers.local_replicas, replicas) if workers.several else None
    monitor = head.monitor if len(val) else "accuracy"
    checkpoint = Checkpoint(run.dir, writes=workers.chief)
    with devices.dtype_policy(precision):
        # inputs: the whole run's batches; epoch e's order depends on (seed, e) only
        def batches_from(first_epoch):
            return inputs.training_batches(head, list(train.path), list(train.y), list(train.Image), size,
                                           run.setting("train.batch_size"), run.setting("train.photos_per_id"),
                                           seed, first_epoch, epochs, replicas, run.setting("train.batch_per_replica"),
                                           shard)

        def dataset(first_epoch):
            if shard is None:  # one worker: Keras cuts each global batch into the replicas' slices
                return batches_from(first_epoch).dataset
            return strategy.distribute_datasets_from_function(lambda _: batches_from(first_epoch).dataset)
        try:
            plan = batches_from(0)
        except ValueError as e:  # a batch too small for the head's layout or the replicas
            raise StageError(str(e)) from None
        where = f"{devices.strategy_name(strategy)} with {replicas} replica(s)"
        if workers.several:
            where += f" on {workers.count} workers (this one: {workers.role.task_type} {workers.role.index}" + (
                ", the chief)" if workers.chief else ")")

        # build, then restore the last checkpoint when resuming (compiled for the phase it was saved in);
        # several workers: the chief restores and every worker takes its values
        schedule = phases(run.setting, epochs)
        with strategy.scope():
            net = models.build_model(run.setting, len(classes), head)
        done = workers.from_chief(checkpoint.epochs_done() if run.resume and workers.chief else None)
        current = phase_of(schedule, done - 1 if done else 0)
        with strategy.scope():
            compile_for(net, run.setting, head, len(classes), current, plan.steps)
        xla, why_not = devices.xla_state(net, run.setting("train.xla"))
        run.echo(f"{len(classes)} classes, {len(train)} training images, {len(val)} validation images; "
                 f"{run.setting('model.backbone')} ({run.setting('model.weights')} weights) at {size} px, "
                 f"{head.name} head, {plan.layout}, up to {epochs} epochs; {where}, {precision}, "
                 f"xla {'on' if xla else 'off'}, op determinism {'on' if deterministic else 'off'}")
        if why_not:
            run.echo(why_not)
        if not len(val):
            run.echo("no validation data: early stopping monitors training accuracy instead")
        restored = checkpoint.load(net) if run.resume and workers.chief else None
        if restored is None and workers.chief:
            if run.resume:
                run.echo("resuming, but no usable checkpoint was left: starting at epoch 1")
            checkpoint.remove()
        state, best_weights = restored if restored else (None, None)
        if workers.several:
            state = workers.from_chief(state)
            workers.sync_from_chief(list(net.variables) + list(net.optimizer.variables))
            if state and not workers.chief:
                best_weights = net.get_weights()  # a stand-in (this worker writes no model), so that early
                #                                   stopping keeps the chief's best epoch as the chief does
        start = state["epochs_done"] if state else 0
        if state:
            run.write_csv("history.csv", history_table(state["history"])[1])  # drop rows logged after it
            run.echo(f"resuming from the checkpoint of epoch {start}: continuing at epoch {start + 1} of {epochs}")

        # fit, phase by phase (fine-tuning: the backbone frozen, then all of it)
        every = run.setting("train.validate_every")
        validation = None
        if len(val) and head.retrieval_validation:
            gallery = train[~train.Id.str.endswith(augment.FLIP)].drop_duplicates("Image")
            validation = RetrievalValidation(gallery.path, gallery.Id, val.path, val.Id, size, eval_batch(plan, replicas),
                                             every=every, epochs=epochs, workers=workers)
        elif len(val):
            validation = ClassifierValidation(val.path, val.y, size, eval_batch(plan, replicas), head, len(classes),
                                              every=every, epochs=epochs, workers=workers)
        stopper = ResumableEarlyStopping(monitor, patience, state and state["early_stopping"], best_weights)
        progress = EpochCheckpoint(checkpoint, stopper, run.echo, epochs, plan.images, state, validation,
                                   run.setting("train.max_minutes"), run.setting("train.checkpoint_every"),
                                   run.setting("train.checkpoint_minutes"), workers)
        bar = StepProgress(plan.steps, plan.size, epochs, enabled=run.session.progress and workers.chief)
        todo = [p for p in schedule if p.end > start] if not (state and state["stopped"]) else []
        for i, phase in enumerate(todo):
            if phase != current:
                with strategy.scope():
                    compile_for(net, run.setting, head, len(classes), phase, plan.steps)
                current = phase
            first = max(start, phase.first)
            if len(schedule) > 1:
                run.echo(f"epochs {first + 1}-{phase.end}: {phase.name}, learning rate {phase.learning_rate:g}")
            stopper.carry_over(last_fit=i == len(todo) - 1)
            callbacks = [c for c in (validation, stopper, progress, bar) if c is not None]
            callbacks += logs(run, state or i > 0, tensorboard=workers.chief)
            net.fit(dataset(first), epochs=phase.end, initial_epoch=first, steps_per_epoch=plan.steps,
                    callbacks=callbacks, shuffle=False, verbose=0)
            if net.stop_training:
                break
        if not todo and best_weights is not None:
            net.set_weights(best_weights)  # finished before the kill: only the artifacts were missing
        if workers.chief:
            save_model(inference_model(net, run.setting, head, len(classes)), run.path("model.keras"))

    # save
    history, table = history_table(progress.rows)
    run.write_json("classes.json", classes)
    run.write_pickle("HISTORY.pickle", history)
    run.write_csv("history.csv", table)
    run.write_pickle("MODEL_TIME.pickle", progress.seconds)
    checkpoint.remove()
    best_epoch = stopper.best_epoch + 1
    best = history[monitor][best_epoch - 1]
    run.echo(f"best {monitor} {best:.4f} at epoch {best_epoch} of {len(progress.rows)}; model in {run.path('model.keras')}")
    counts = {"epochs": len(progress.rows), "best_epoch": best_epoch, f"best_{monitor}": round(best, 4),
              "classes": len(classes), "replicas": replicas, "precision": precision, "xla": xla}
    if workers.several:
        counts["workers"] = workers.count
    rates = progress.rates[1:] or progress.rates  # the first epoch of a process includes tracing
    if rates:
        counts["images_per_second"] = round(float(np.median(rates)), 1)
    if state:
        counts["resumed_from_epoch"] = start
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


def read_inputs(run: Run) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Training and validation files (with a class index `y` and a full `path`) and the class list."""
    train = run.read_csv("split", "train_files.csv")
    val = run.read_csv("split", "val_files.csv")
    images = run.upstream("augment", "images")
    if train.empty:
        raise StageError("split/train_files.csv lists no training images: nothing to train on")
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


class Phase(NamedTuple):
    name: str
    first: int            # first epoch (0-based)
    end: int              # one past the last epoch
    backbone_frozen: bool
    learning_rate: float


def phases(get, epochs: int) -> list[Phase]:
    """train.head_epochs > 0 (fine-tuning pretrained weights): those epochs train the head alone on a
    frozen backbone at train.head_learning_rate, then the whole network trains at train.learning_rate.
    Otherwise one phase, the whole network."""
    k = min(get("train.head_epochs"), epochs)
    out = [Phase("head only (backbone frozen)", 0, k, True, get("train.head_learning_rate"))] if k else []
    if k < epochs:
        out.append(Phase("whole network", k, epochs, False, get("train.learning_rate")))
    return out


def phase_of(schedule: list[Phase], epoch: int) -> Phase:
    return next((p for p in schedule if p.first <= epoch < p.end), schedule[-1])


def learning_rate(get, phase: Phase, steps_per_epoch: int | None):
    """The phase's learning rate, constant, or with train.lr_schedule = cosine: decayed along a half
    cosine to 0 over the phase (its epochs x steps per epoch), after one epoch of linear warm-up from
    0. The schedule is a function of the optimizer's step count, which the checkpoint saves: a
    resumed run continues on the same curve."""
    lr = phase.learning_rate
    if get("train.lr_schedule") == "constant" or steps_per_epoch is None:
        return lr
    epochs = phase.end - phase.first
    warmup = steps_per_epoch if epochs > 1 else 0
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else lr, decay_steps=max(1, epochs * steps_per_epoch - warmup),
        warmup_target=lr if warmup else None, warmup_steps=warmup)


def compile_for(net, get, head, n_classes: int, phase: Phase, steps_per_epoch: int | None = None) -> None:
    """Freeze or unfreeze the backbone for the phase, then compile with a new Adam (the phase's
    learning rate), the head's loss and metrics and the jit setting; the optimizer is built so its
    variables exist for a checkpoint to fill. Under mixed_float16 the optimizer is wrapped in a loss
    scale optimizer whose overflow check all replicas agree on (devices.py). Call it inside the
    strategy's scope."""
    models.set_trainable(net, not phase.backbone_frozen, get("model.freeze_bn"), get("model.finetune_fraction"))
    decay = get("train.weight_decay")
    optimizer = keras.optimizers.Adam(learning_rate(get, phase, steps_per_epoch), weight_decay=decay or None)
    if net.dtype_policy.name == "mixed_float16":
        optimizer = devices.loss_scale_optimizer(optimizer)  # (Keras' own, with the overflow check agreed)
    with warnings.catch_warnings():  # (XLA refused: the stage says so and why, devices.xla_state)
        warnings.filterwarnings("ignore", message="Model doesn't support `jit_compile=True`")
        net.compile(optimizer=optimizer, loss=head.loss(), metrics=head.metrics(n_classes),
                    jit_compile=bool(get("train.xla")))
    net.optimizer.build(net.trainable_variables)


def compiled_model(get, head, n_classes: int, steps_per_epoch: int | None = None):
    """The model compiled for its first training phase (benchmarks). Inside the strategy's scope."""
    net = models.build_model(get, n_classes, head)
    compile_for(net, get, head, n_classes, phases(get, get("train.epochs"))[0], steps_per_epoch)
    return net


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
