"""The train stage's Keras callbacks, each with its inputs as explicit arguments:

    RetrievalValidation     heads validated by retrieval: val_map5 / val_top1 after each epoch
    ResumableEarlyStopping  Keras' EarlyStopping whose state survives a kill
    EpochCheckpoint         after each epoch: checkpoint.npz, the time budget, one progress line
    StepProgress            a progress bar inside each epoch (steps, img/s, ETA); off with --quiet
"""
from __future__ import annotations

import time

import keras
import numpy as np

from . import heads
from .checkpoint import Checkpoint
from .files import fault_point
from .inputs import encode_files
from .retrieval import GalleryScorer
from .submission import map5


class RetrievalValidation(keras.callbacks.Callback):
    """After each epoch, embed the training photos (their first file, the original) and the validation
    photos, rank the training ids for each validation photo by its best-matching photo, and add
    val_map5 and val_top1 to the epoch's logs. Closed set: every validation id has training photos."""

    def __init__(self, gallery_paths: list[str], gallery_ids: list[str], val_paths: list[str],
                 val_ids: list[str], image_size: int, batch_size: int, top_k: int = 5):
        super().__init__()
        self.gallery_paths, self.gallery_ids = list(gallery_paths), list(gallery_ids)
        self.val_paths, self.val_ids = list(val_paths), list(val_ids)
        self.image_size, self.batch_size, self.top_k = image_size, batch_size, top_k
        self.seconds = 0.0

    def on_train_begin(self, logs=None):
        self.head = heads.from_model(self.model)
        self.encoder = self.head.encoder(self.model)  # shares the model's layers: current weights

    def on_epoch_end(self, epoch, logs=None):
        t0 = time.perf_counter()
        encode = lambda x: np.asarray(self.encoder.predict_on_batch(x), np.float32)  # noqa: E731
        vectors = encode_files(encode, self.gallery_paths + self.val_paths, self.image_size, self.batch_size,
                               progress=False)
        n = len(self.gallery_paths)
        scorer = GalleryScorer(encode, lambda q, g: self.head.similarity(self.model, q, g), vectors[:n],
                               self.gallery_ids)
        top = np.argsort(-scorer.scores(vectors[n:]), axis=1, kind="stable")[:, :self.top_k]
        ranked = [[scorer.classes[c] for c in row] for row in top]
        if logs is not None:
            logs["val_map5"] = map5(self.val_ids, ranked)
            logs["val_top1"] = float(np.mean([r[0] == t for r, t in zip(ranked, self.val_ids)]))
        self.seconds = time.perf_counter() - t0


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping (max of `monitor`, restore best weights) starting from a checkpoint's state."""

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
    """After each epoch: save the checkpoint (model, optimizer, early stopping, history, time), stop
    when train.max_minutes is used up, and print one line. `rows`, `seconds` and `rates` (images per
    second per epoch, validation excluded) are what the stage reports at the end."""

    def __init__(self, checkpoint: Checkpoint, stopper: ResumableEarlyStopping, echo, epochs: int,
                 images_per_epoch: int, state: dict | None = None, validation: RetrievalValidation | None = None,
                 max_minutes: float = 0.0):
        super().__init__()
        self.checkpoint, self.stopper, self.echo, self.epochs = checkpoint, stopper, echo, epochs
        self.images_per_epoch, self.validation, self.max_minutes = images_per_epoch, validation, max_minutes
        self.rows = list(state["history"]) if state else []
        self.seconds = float(state["seconds"]) if state else 0.0
        self.rates: list[float] = []

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
        if out_of_time:
            self.model.stop_training = True
        logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        self.rows.append({"epoch": epoch, **logs})
        stopper = self.stopper
        state = {"epochs_done": epoch + 1, "early_stopping": stopper.state(),
                 "stopped": bool(self.model.stop_training), "history": self.rows, "seconds": self.seconds}
        self.checkpoint.save(self.model, state, stopper.best_weights, stopper.best_epoch)
        fault_point("train.epoch_saved")
        order = sorted(logs, key=lambda k: (k.startswith("val_"), "accuracy" in k, k))
        shown = " ".join(f"{k} {logs[k]:.4f}" for k in order)
        self.echo(f"epoch {epoch + 1}/{self.epochs}: {shown} | best {stopper.monitor} {stopper.best:.4f} at epoch "
                  f"{stopper.best_epoch + 1} | {now - self.t0:.1f}s, {self.rates[-1]:.0f} img/s | checkpoint saved")
        if out_of_time:
            self.echo(f"time budget: {self.seconds / 60:.1f} of train.max_minutes = {self.max_minutes:g} minutes "
                      f"used; stopping with the best epoch's weights")
        elif self.model.stop_training:
            self.echo(f"early stopping: {stopper.monitor} has not improved for {stopper.patience} epochs")


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
