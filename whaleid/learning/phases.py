"""The training schedule: fine-tuning phases (the head alone on a frozen backbone, then the whole
network), each phase's learning rate (constant or cosine with warm-up), and compiling the model for
a phase. train.py runs the phases; benchmarks build a compiled model here (compiled_model)."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import keras

from whaleid.learning import devices, model as models


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
