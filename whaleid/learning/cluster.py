"""Multi-worker training (train.strategy = multiworker, one process per machine, TF_CONFIG set on
each): who this process is, and how a command runs the stages when it is one of several workers.
Light: no TensorFlow here (the CLI imports it for every command).

    role(cfg)                     this process's Role in the cluster, or None (not a multi-worker run)
    run_stages(session, stages, force, command, lock)
                                  what cli.run_command does under the work-folder lock, per role

Only the chief writes: it takes the work-folder lock, runs the train stage as any run does
(checkpoints, artifacts, the stage's manifest). Every other worker trains in step with it (each
step's gradients are summed across all workers) but writes nothing into the work folder: it takes no
lock, runs the train stage's function with a scratch folder of its own (a temp dir, deleted at the
end) and writes no manifest. Workers get the chief's resume point, validation results and stop
decisions from the chief (train.py, devices.from_chief), so the work folder may be one shared folder
or a copy per machine, made after preprocessing.

Every stage before train must be up to date before a multi-worker training starts (run `whaleid
preprocess` first, once, without TF_CONFIG): TensorFlow's collective ops must be configured before
anything else in the process starts TensorFlow's runtime, and a preprocess stage may (boxes).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from whaleid.pipeline.files import StageError

TRAIN = "train"


@dataclass(frozen=True)
class Role:
    task_type: str     # "chief" or "worker" (TF_CONFIG's task.type)
    index: int         # TF_CONFIG's task.index
    workers: int       # processes that train (chief and workers)
    chief: bool        # the one that writes

    def __str__(self) -> str:
        return f"{self.task_type} {self.index} of {self.workers} worker(s){' (chief)' if self.chief else ''}"


def parse_tf_config(text: str | None) -> Role | None:
    """The Role TF_CONFIG describes (None: unset, empty, or a cluster of one)."""
    if not text:
        return None
    try:
        spec = json.loads(text)
        cluster, task = spec.get("cluster") or {}, spec.get("task") or {}
        task_type, index = str(task["type"]), int(task.get("index", 0))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise StageError(f"TF_CONFIG is not a valid cluster description ({e}): expected "
                         f'{{"cluster": {{"worker": ["host:port", ...]}}, "task": {{"type": "worker", "index": 0}}}}') from None
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if task_type not in ("chief", "worker"):
        raise StageError(f"TF_CONFIG task type {task_type!r}: whaleid's multi-worker training runs chief and worker "
                         f"tasks only (MultiWorkerMirroredStrategy)")
    if workers <= 1:
        return None
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and not cluster.get("chief"))
    return Role(task_type, index, workers, chief)


def role(cfg: dict | None = None) -> Role | None:
    """This process's role when it trains with train.strategy = multiworker and TF_CONFIG names a
    cluster of several workers; None otherwise (cfg None: TF_CONFIG alone decides)."""
    if cfg is not None and cfg.get("train", {}).get("strategy") != "multiworker":
        return None
    return parse_tf_config(os.environ.get("TF_CONFIG"))


def run_stages(session, stages: list, force: set, command: str, lock) -> None:
    """Run `stages` as cli.run_command does: under the work-folder lock `lock(work, command)` (a
    context manager). In a multi-worker training: the chief as always; another worker without the
    lock and trains only (see the module docstring). Either role first checks that every stage
    before train is up to date."""
    me = role(session.cfg) if any(s.name == TRAIN for s in stages) else None
    if me is None:
        with lock(session.work, command):
            session.run(stages, force)
        return
    _check_upstream(session, stages, force, me)
    if me.chief:
        with lock(session.work, command):
            session.run(stages, force)
        return
    train = next(s for s in stages if s.name == TRAIN)
    status = session.status(train)
    if status.done and TRAIN not in session.downstream(set(force)):
        session.echo(f"[{TRAIN}] up to date (cached) - {session.dir(TRAIN)}; {me}: nothing to train")
        return
    run_worker(session, train, me)
    later = [s.name for s in stages if stages.index(s) > stages.index(train)]
    if later:
        session.echo(f"[{TRAIN}] {me}: the chief writes the model; {', '.join(later)} run(s) on the chief only")


def _check_upstream(session, stages, force, me: Role) -> None:
    names = [s.name for s in stages]
    forced = session.downstream(set(force))
    seen: dict = {}
    for st in stages[:names.index(TRAIN)]:
        if st.name in forced or not session.status(st, seen).done:
            raise StageError(f"train.strategy = multiworker ({me}): stage {st.name} is not up to date in "
                             f"{session.work}. Run `whaleid preprocess` there first (one process, no TF_CONFIG), "
                             f"then start `whaleid train` on every worker; a worker's work folder is the chief's "
                             f"(shared) or a copy made after preprocessing.")


def run_worker(session, stage, me: Role) -> dict:
    """A non-chief worker's share of the train stage: the stage's function with a Run whose folder is
    a scratch temp dir (deleted after), no lock, no manifest. Returns the stage's counts."""
    from whaleid.pipeline.stage import Run  # (light: no TensorFlow)
    scratch = tempfile.mkdtemp(prefix=f"whaleid-{me.task_type}{me.index}-")
    session.echo(f"[{stage.name}] running as {me}: training in step with the chief, writing nothing to "
                 f"{session.work} (scratch folder {scratch})")
    run = Run(session, stage, resume=False)
    run.dir = Path(scratch)
    try:
        counts = stage.function()(run) or {}
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    session.echo(f"[{stage.name}] {me}: done")
    return counts
