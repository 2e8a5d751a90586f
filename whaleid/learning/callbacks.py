"""The train stage's Keras callbacks, each with its inputs as explicit arguments:

    RetrievalValidation     heads validated by retrieval: val_map5 / val_top1
    ClassifierValidation    the others (softmax): val_loss and the head's metrics, as a one-device evaluate
    ResumableEarlyStopping  Keras' EarlyStopping whose state survives a kill
    EpochCheckpoint         after each epoch: the agreed stop, checkpoint.npz, the time budget, one line
    StepProgress            a progress bar inside each epoch (steps, img/s, ETA); off with --quiet

Validation decodes its photos once (uint8, kept in memory) and computes on the model's device every
train.validate_every epochs (and after the last); on several workers the chief computes it and the
others take its numbers (devices.Workers.from_chief), so early stopping decides the same everywhere.
"""
from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from whaleid.learning import heads
from whaleid.learning.checkpoint import Checkpoint
from whaleid.pipeline.files import fault_point
from whaleid.learning.inputs import load_images, padded
from whaleid.metrics.submission import map5
from whaleid.similarity.gallery import IdIndex

MAX_ELEMENTS = 1 << 26  # floats in one chunk of query x gallery x dimension (a siamese |q - g|)


class _Workers:
    """One worker (tests and benchmarks that build callbacks without a strategy)."""
    several, chief = False, True

    @staticmethod
    def from_chief(obj):
        return obj


class Validation(keras.callbacks.Callback):
    """Every `every` epochs and after epoch `epochs`: `compute()` on the chief, its numbers added to
    the epoch's logs on every worker. `seconds`: the last validation's time (0 when none ran)."""

    def __init__(self, image_size: int, batch_size: int, every: int = 1, epochs: int = 0, workers=None):
        super().__init__()
        self.image_size, self.batch_size, self.every, self.epochs = image_size, batch_size, max(1, every), epochs
        self.workers = workers or _Workers()
        self.seconds = 0.0
        self.images = None

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs

    def on_train_begin(self, logs=None):
        if self.workers.chief and self.images is None:
            self.images = self.load()  # once per training (every phase's fit reuses them)

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = 0.0
        if not self.due(epoch):
            return
        t0 = time.perf_counter()
        values = self.compute() if self.workers.chief else None
        values = self.workers.from_chief(values)
        if logs is not None:
            logs.update(values)
        self.seconds = time.perf_counter() - t0

    def load(self):
        raise NotImplementedError

    def compute(self) -> dict:
        raise NotImplementedError

    def outputs(self, model, images: np.ndarray):
        """model(images) batch by batch on the model's device (uint8 in, cast there), as one tensor;
        the last batch padded to the batch size (one traced shape)."""
        if getattr(self, "_traced", (None,))[0] is not model:  # traced once per model, not per validation
            self._traced = (model, tf.function(lambda x: model(x, training=False), reduce_retracing=True))
        run = self._traced[1]
        out = []
        for s in range(0, len(images), self.batch_size):
            batch = images[s:s + self.batch_size]
            out.append(run(tf.constant(padded(batch, self.batch_size)))[:len(batch)])
        return tf.concat(out, 0)


class RetrievalValidation(Validation):
    """Embed the training photos (their first file, the original) and the validation photos, rank
    the training ids for each validation photo by its best-matching photo, and add val_map5 and
    val_top1 to the epoch's logs. Closed set: every validation id has training photos. On the
    device when the head has similarity_ops (the NumPy similarity otherwise)."""

    def __init__(self, gallery_paths: list[str], gallery_ids: list[str], val_paths: list[str],
                 val_ids: list[str], image_size: int, batch_size: int, top_k: int = 5, every: int = 1,
                 epochs: int = 0, workers=None):
        super().__init__(image_size, batch_size, every, epochs, workers)
        self.gallery_paths, self.gallery_ids = list(gallery_paths), list(gallery_ids)
        self.val_paths, self.val_ids = list(val_paths), list(val_ids)
        self.top_k = top_k
        self.index = IdIndex(self.gallery_ids)  # the ids by their best photo, as inference ranks them
        self.classes = self.index.classes

    def load(self):
        return load_images(self.gallery_paths + self.val_paths, self.image_size, self.batch_size)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.head = heads.from_model(self.model)
        self.encoder = self.head.encoder(self.model)  # shares the model's layers: current weights

    def compute(self) -> dict:
        vectors = self.outputs(self.encoder, self.images)
        n = len(self.gallery_paths)
        top = self.ranked(vectors[:n], vectors[n:])
        ranked = [[str(self.classes[c]) for c in row] for row in top]
        return {"val_map5": map5(self.val_ids, ranked),
                "val_top1": float(np.mean([r[0] == t for r, t in zip(ranked, self.val_ids)]))}

    def ranked(self, G, Q) -> np.ndarray:
        """(nq, top_k) class indices: each id scored by its best gallery photo, best first (ties: the
        lower index, as a stable sort). Similarities on the device when the head has similarity_ops."""
        per_chunk = max(1, MAX_ELEMENTS // max(1, int(G.shape[0]) * int(G.shape[-1])))
        out = []
        for s in range(0, int(Q.shape[0]), per_chunk):
            q = Q[s:s + per_chunk]
            sim = self.head.similarity_ops(self.model, q, G)
            sim = self.head.similarity(self.model, np.asarray(q), np.asarray(G)) if sim is None else sim
            out.append(self.index.top(np.asarray(sim, np.float32), self.top_k))
        return np.concatenate(out) if out else np.zeros((0, min(self.top_k, len(self.classes))), np.int64)


class ClassifierValidation(Validation):
    """The heads validated by their own outputs (softmax): val_loss (the mean of the head's loss
    over the validation photos) and val_<metric> for each of the head's metrics, as a one-device
    evaluate would give them whatever the strategy."""

    def __init__(self, paths: list[str], labels, image_size: int, batch_size: int, head, n_classes: int,
                 every: int = 1, epochs: int = 0, workers=None):
        super().__init__(image_size, batch_size, every, epochs, workers)
        self.paths, self.labels = list(paths), np.asarray(labels, np.int32)
        self.head, self.n_classes = head, n_classes

    def load(self):
        return load_images(self.paths, self.image_size, self.batch_size)

    def compute(self) -> dict:
        probs = self.outputs(self.model, self.images)
        y = tf.constant(self.labels)
        loss = self.head.loss()
        per_row = tf.reshape(tf.cast(loss.call(y, probs), tf.float64), [-1])
        out = {"val_loss": float(tf.reduce_mean(per_row))}
        for metric in self.head.metrics(self.n_classes):
            metric.update_state(y, probs)
            out[f"val_{metric.name}"] = float(metric.result())
        return out


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping (max of `monitor`, restore best weights) starting from a checkpoint's state,
    except that an epoch that ties the best keeps its weights (patience still counts from the first
    best): a validation metric over a few hundred photos saturates (the demo's val_map5 sits at 0.9861
    from epoch 4 to 10), and the later weights, trained longer, separate known from new individuals
    better (demo, synthetic seed 0: test MAP@5 0.9745 with the last tied epoch vs 0.9587 with the first).
    """

    def __init__(self, monitor: str, patience: int, restored: dict | None = None, restored_weights=None):
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

    def on_epoch_end(self, epoch, logs=None):
        current = self.get_monitor_value(logs)
        tie = current is not None and self.best is not None and self.best_weights is not None \
            and float(current) == float(self.best)
        super().on_epoch_end(epoch, logs)
        if tie and epoch > self.best_epoch:
            self.best_epoch, self.best_weights = epoch, self.model.get_weights()

    def get_monitor_value(self, logs):
        """The monitored value, or None on an epoch without validation (train.validate_every)."""
        return (logs or {}).get(self.monitor)

    def carry_over(self, last_fit: bool) -> None:
        """Before another fit() of the same training (the next fine-tuning phase): keep counting from
        here, and restore the best weights only when the last fit ends (the next phase starts from
        the last epoch's weights, as a run resumed from the checkpoint would)."""
        if hasattr(self, "best_epoch"):  # (a fit has run: its state goes on)
            self.restored, self.restored_weights = self.state(), self.best_weights
        self.restore_on_end = last_fit

    def on_train_end(self, logs=None):
        if getattr(self, "restore_on_end", True):
            super().on_train_end(logs)


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: agree on stopping (several workers: the chief's decision, early stopping's or
    the time budget's, holds everywhere, so no worker waits at a step the others never take), save
    the checkpoint (model, optimizer, early stopping, history, time) every `every` epochs, or when
    `minutes` (> 0) have passed since the last save, and always when training stops or ends; stop
    when train.max_minutes is used up, and print one line. `rows`, `seconds` and `rates` (images per
    second per epoch, validation excluded) are what the stage reports at the end."""

    def __init__(self, checkpoint: Checkpoint, stopper: ResumableEarlyStopping, echo, epochs: int,
                 images_per_epoch: int, state: dict | None = None, validation: Validation | None = None,
                 max_minutes: float = 0.0, every: int = 1, minutes: float = 0.0, workers=None):
        super().__init__()
        self.checkpoint, self.stopper, self.echo, self.epochs = checkpoint, stopper, echo, epochs
        self.images_per_epoch, self.validation, self.max_minutes = images_per_epoch, validation, max_minutes
        self.every, self.minutes = max(1, every), minutes
        self.workers = workers or _Workers()
        self.rows = list(state["history"]) if state else []
        self.seconds = float(state["seconds"]) if state else 0.0
        self.rates: list[float] = []
        self.saved_epoch = int(state["epochs_done"]) if state else 0
        self.saved_at = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = self.t_val = time.perf_counter()
        self.validating = False

    def on_train_batch_end(self, batch, logs=None):
        fault_point("train.batch")

    def on_test_begin(self, logs=None):
        self.t_val, self.validating = time.perf_counter(), True

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        train_seconds = (self.t_val if self.validating else now) - self.t0
        if self.validation is not None:
            train_seconds -= self.validation.seconds
        self.rates.append(self.images_per_epoch / max(train_seconds, 1e-9))
        self.seconds += now - self.t0
        out_of_time = (bool(self.max_minutes) and self.seconds >= 60 * self.max_minutes
                       and epoch + 1 < self.epochs)
        decision = self.workers.from_chief({"stop": bool(self.model.stop_training) or out_of_time,
                                            "out_of_time": out_of_time, "seconds": self.seconds})
        out_of_time, self.seconds = decision["out_of_time"], decision["seconds"]
        self.model.stop_training = decision["stop"]
        logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        self.rows.append({"epoch": epoch, **logs})
        stopper = self.stopper
        save = (epoch + 1 - self.saved_epoch >= self.every or epoch + 1 == self.epochs or self.model.stop_training
                or (self.minutes > 0 and now - self.saved_at >= 60 * self.minutes))
        if save:
            state = {"epochs_done": epoch + 1, "early_stopping": stopper.state(),
                     "stopped": bool(self.model.stop_training), "history": self.rows, "seconds": self.seconds}
            self.checkpoint.save(self.model, state, stopper.best_weights, stopper.best_epoch)
            self.saved_epoch, self.saved_at = epoch + 1, time.perf_counter()
            fault_point("train.epoch_saved")
        order = sorted(logs, key=lambda k: (k.startswith("val_"), "accuracy" in k, k))
        shown = " ".join(f"{k} {logs[k]:.4f}" for k in order)
        best = "" if stopper.best is None or not np.isfinite(stopper.best) else (
            f" | best {stopper.monitor} {stopper.best:.4f} at epoch {stopper.best_epoch + 1}")
        saved = "checkpoint saved" if save and self.checkpoint.writes else (
            "no checkpoint (the chief writes)" if save else f"checkpoint at epoch {self.saved_epoch}")
        self.echo(f"epoch {epoch + 1}/{self.epochs}: {shown}{best} | {now - self.t0:.1f}s, "
                  f"{self.rates[-1]:.0f} img/s | {saved}")
        if out_of_time:
            self.echo(f"time budget: {self.seconds / 60:.1f} of train.max_minutes = {self.max_minutes:g} minutes "
                      f"used; stopping with the best epoch's weights")
        elif self.model.stop_training:
            self.echo(f"early stopping: {stopper.monitor} has not improved for {stopper.patience} "
                      f"validated epochs")


class StepProgress(keras.callbacks.Callback):
    """A progress bar inside each epoch: steps done of `steps`, images per second, the epoch's ETA
    (tqdm, on stderr; the epoch line of EpochCheckpoint stays the record). Off when not `enabled`
    (--quiet). Use it with fit(verbose=0), in place of Keras' own bar."""

    def __init__(self, steps: int, batch_size: int, epochs: int, enabled: bool = True):
        super().__init__()
        self.steps, self.batch_size, self.epochs, self.enabled = steps, batch_size, epochs, enabled
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        if not self.enabled:
            return
        from tqdm import tqdm
        self.t0, self.done = time.perf_counter(), 0
        self.bar = tqdm(total=self.steps, desc=f"[train] epoch {epoch + 1}/{self.epochs}", unit="step",
                        leave=False, dynamic_ncols=True, mininterval=0.5)

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is None:
            return
        self.done += 1
        rate = self.done * self.batch_size / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} img/s" + (f", loss {float(logs['loss']):.4f}" if logs and "loss" in logs else ""),
                                 refresh=False)
        self.bar.update(1)
        if self.done >= self.steps:  # before the epoch's line, whatever the order of the callbacks
            self.close()

    def on_test_begin(self, logs=None):  # validation: the training steps are done
        self.close()

    def on_epoch_end(self, epoch, logs=None):
        self.close()

    def on_train_end(self, logs=None):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
