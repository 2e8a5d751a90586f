"""Training's resume point: after every epoch one atomic file, checkpoint.npz, holds every model
variable (weights, batch-norm statistics, the random state of dropout and of the online augmentation
layers), every optimizer variable (Adam's moments and step), and the state: epochs done, early
stopping's best value / wait / best epoch, the history so far, seconds spent. The best epoch's
weights sit in best-<epoch>.npz (written only when the best changes).

A checkpoint resumes under another precision or device layout (a run moved from a CPU to a GPU
machine, from one GPU to eight): model variables are the same in number and order whatever the
strategy and precision (mixed precision keeps float32 variables); the optimizer is saved as the
inner optimizer's variables (Adam's, the same everywhere) plus, by name, the extra variables of the
mixed-precision wrapper (LossScaleOptimizer's loss scale and its step counter), which a run without
it ignores and a run with it restores when present or starts fresh (its initial scale) when not.
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from whaleid.pipeline.files import atomic_path, fault_point

CHECKPOINT = "checkpoint.npz"
BEST = "best-{epoch:04d}.npz"


def _save_arrays(path: Path, arrays: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def _numpy(v):
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v)


def optimizer_parts(optimizer) -> tuple[list, dict]:
    """(the inner optimizer's variables, in order; {name: variable} of a wrapper's own variables)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is None:
        return list(optimizer.variables), {}
    own = {v.path.rsplit("/", 1)[-1]: v for v in optimizer.variables if not any(v is w for w in inner.variables)}
    return list(inner.variables), own


class Checkpoint:
    """checkpoint.npz: model variables m*, optimizer variables o*, the JSON state; best-<epoch>.npz:
    the best epoch's weights (w*). The state names the best file it goes with, so a kill between the
    two writes never pairs a state with the wrong best weights."""

    def __init__(self, folder: Path, writes: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / CHECKPOINT
        self.writes = writes   # False: a multi-worker training's non-chief worker (only the chief writes)
        self.best_file = None  # the best file the last state saved or loaded names

    def save(self, model, state: dict, best_weights, best_epoch: int | None) -> None:
        if not self.writes:
            return
        best = None
        if best_weights is not None and best_epoch is not None:
            best = BEST.format(epoch=best_epoch)
            if best != self.best_file:  # (a file of that name left by a killed run is rewritten)
                _save_arrays(self.folder / best, {f"w{i:05d}": _numpy(w) for i, w in enumerate(best_weights)})
                fault_point("train.best_saved")  # a kill here must not pair the old state with this file
        arrays = {f"m{i:05d}": _numpy(v) for i, v in enumerate(model.variables)}
        inner, own = optimizer_parts(model.optimizer)
        arrays.update({f"o{i:05d}": _numpy(v) for i, v in enumerate(inner)})
        arrays.update({f"x_{name}": _numpy(v) for name, v in own.items()})
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
                extra = {k[2:]: z[k] for k in z.files if k.startswith("x_")}
            best = None
            if state.get("best_file"):
                with np.load(self.folder / state["best_file"], allow_pickle=False) as z:
                    best = [z[k] for k in sorted(z.files)]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # unreadable (a disk problem: the file itself is written atomically)
        inner, own = optimizer_parts(model.optimizer)
        targets = [(model.variables, m), (inner, o)]
        for variables, values in targets:
            if len(variables) != len(values) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
                return None  # another model (e.g. a different Keras version built it differently)
        targets.append(([own[k] for k in extra if k in own], [extra[k] for k in extra if k in own]))
        for variables, values in targets:
            for v, a in zip(variables, values):
                v.assign(a)
        self.best_file = state.get("best_file")
        return state, best

    def epochs_done(self) -> int | None:
        """Epochs the checkpoint holds, read without restoring anything (None: no usable checkpoint)."""
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return int(json.loads(str(z["state"]))["epochs_done"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None

    def remove(self) -> None:
        for p in [self.path, *self.folder.glob("best-*.npz")]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
