"""Multi-worker training (train.strategy = multiworker): two worker processes on localhost with
TF_CONFIG (MultiWorkerMirroredStrategy on CPU) train test_train's tiny model on one shared work
folder. The chief takes the lock and writes; the other worker takes no lock, writes nothing there,
and follows the chief's resume point, validation and stop decisions. Also runnable as a worker:
    TF_CONFIG=... python tests/test_multiworker.py WORK [key=value ...]
(runs the stages as the CLI does, through cluster.run_stages; prints `finished` or `StageError: ...`)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import AUGMENT, SPLIT, manifest, session

from whaleid.learning import cluster
from whaleid.pipeline.stage import StageError

SETTINGS = ["train.strategy=multiworker", "train.epochs=2"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports, index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": index}})


def start(work, ports, index, env=None, extra=()):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "TF_CONFIG": tf_config(ports, index),
           **(env or {})}
    return subprocess.Popen([sys.executable, __file__, str(work), *SETTINGS, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def epoch_lines(out: str) -> list[str]:
    """The epoch lines without their timing part ("epoch 2/2: loss .. val_accuracy .. | best ..")."""
    return [re.sub(r" \| [\d.]+s, \d+ img/s \|.*$", "", x) for x in out.splitlines() if re.search(r"\] epoch \d+/", x)]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_two_workers_train_in_step_only_the_chief_writes_and_a_killed_worker_resumes(tmp_path):
    work = tmp_path / "shared"                     # one work folder for both (a shared disk)
    session(work, SETTINGS).run([AUGMENT, SPLIT])  # preprocessing first, without TF_CONFIG
    upstream = files_under(work)

    # 1. the worker dies right after epoch 1; the chief has saved epoch 1 and waits for it: the job
    # is killed (a pre-empted VM)
    ports = free_ports(2)
    chief = start(work, ports, 0)
    worker = start(work, ports, 1, env={"WHALEID_FAULT": "train.epoch_saved@1"})
    out_w = worker.communicate(timeout=400)[0]
    assert worker.returncode == -signal.SIGKILL, out_w[-3000:]
    from whaleid.learning.checkpoint import Checkpoint
    deadline = time.time() + 60
    while Checkpoint(work / "train").epochs_done() != 1 and chief.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    chief.kill()
    out_c = chief.communicate(timeout=60)[0]
    assert Checkpoint(work / "train").epochs_done() == 1, out_c[-3000:]
    assert "running as worker 1 of 2 worker(s)" in out_w, out_w[-3000:]

    # 2. both restart: the chief resumes from its checkpoint and the worker takes the chief's state
    ports = free_ports(2)
    chief, worker = start(work, ports, 0), start(work, ports, 1)
    out_c, out_w = chief.communicate(timeout=400)[0], worker.communicate(timeout=400)[0]
    assert chief.returncode == 0 and out_c.rstrip().endswith("finished"), out_c[-3000:]
    assert worker.returncode == 0 and out_w.rstrip().endswith("finished"), out_w[-3000:]
    m = manifest(work)
    assert m["resumed"] and m["counts"]["resumed_from_epoch"] == 1 and m["counts"]["epochs"] == 2
    assert m["counts"]["workers"] == 2 and m["counts"]["replicas"] == 2
    assert "resuming from the checkpoint of epoch 1" in out_w, "the worker resumed from the chief's state"
    assert "MultiWorkerMirroredStrategy with 2 replica(s) on 2 workers" in out_c, out_c[-3000:]
    # in step: the same training loss (all-reduced) and the chief's validation on both
    assert epoch_lines(out_c) == epoch_lines(out_w) and len(epoch_lines(out_c)) == 1, (out_c[-2000:], out_w[-2000:])
    # only the chief wrote: the train stage's artifacts, manifest and logs; no checkpoint left, no lock
    written = files_under(work) - upstream
    assert all(f.startswith("train/") or f == ".whaleid_state" for f in written), written
    assert {"train/model.keras", "train/manifest.json", "train/HISTORY.pickle"} <= written
    assert not any(f.endswith(".npz") or ".lock" in f for f in written), written


def test_workers_with_different_settings_both_stop_with_the_reason(tmp_path):
    work = tmp_path / "w"
    session(work, SETTINGS).run([AUGMENT, SPLIT])
    ports = free_ports(2)
    procs = [start(work, ports, 0), start(work, ports, 1, extra=["model.dropout=0.3"])]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 1 and "StageError: 1 worker(s) differ from the chief in the train stage's settings" in out, \
            out[-2000:]


def test_tf_config_roles():
    assert cluster.parse_tf_config(None) is None
    one = json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    assert cluster.parse_tf_config(one) is None
    two = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    r = cluster.parse_tf_config(json.dumps(two))
    assert (r.workers, r.chief, r.index) == (2, False, 1)
    two["task"]["index"] = 0
    assert cluster.parse_tf_config(json.dumps(two)).chief
    with_chief = {"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    assert not cluster.parse_tf_config(json.dumps(with_chief)).chief
    with_chief["task"] = {"type": "chief", "index": 0}
    assert cluster.parse_tf_config(json.dumps(with_chief)).chief
    with pytest.raises(StageError, match="TF_CONFIG"):
        cluster.parse_tf_config("{not json")
    with pytest.raises(StageError, match="chief and worker"):
        cluster.parse_tf_config(json.dumps({"cluster": {"worker": ["a:1", "b:1"], "ps": ["p:1"]},
                                            "task": {"type": "ps", "index": 0}}))


def test_a_worker_refuses_to_start_before_preprocessing(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 1))
    s = session(tmp_path / "w", SETTINGS)
    with pytest.raises(StageError, match="Run `whaleid preprocess` there first"):
        cluster.run_stages(s, s.stages, set(), "train", lambda *a: pytest.fail("a worker takes no lock"))


class ChiefSays:
    """Workers stand-in: this process is a non-chief whose chief decided `decision`."""
    several, chief = True, False

    def __init__(self, decision):
        self.decision = decision

    def from_chief(self, obj):
        return {**obj, **self.decision}


def test_the_time_budget_and_stopping_follow_the_chief(tmp_path):
    from whaleid.learning.callbacks import EpochCheckpoint, ResumableEarlyStopping
    from whaleid.learning.checkpoint import Checkpoint

    class Model:
        def __init__(self):
            self.stop_training = False
    lines = []
    stopper = ResumableEarlyStopping("val_map5", 3)
    stopper.best, stopper.best_epoch = 0.5, 0
    cb = EpochCheckpoint(Checkpoint(tmp_path, writes=False), stopper, lines.append, 10, 100, max_minutes=1000.0,
                         workers=ChiefSays({"stop": True, "out_of_time": True, "seconds": 61.0}))
    cb.set_model(Model())
    cb.on_epoch_begin(0)
    cb.on_epoch_end(0, {"loss": 1.0})
    assert cb.model.stop_training, "stops with the chief although this worker's own clock had time left"
    assert cb.seconds == 61.0 and any("time budget" in x for x in lines)
    assert not list(tmp_path.iterdir()), "a non-chief worker writes no checkpoint"


def _main(argv) -> int:
    from whaleid.pipeline.files import work_lock
    work, overrides = Path(argv[0]), argv[1:]
    s = session(work, overrides, echo=lambda m: print(m, flush=True))
    try:
        cluster.run_stages(s, s.stages, set(), "train", work_lock)
    except StageError as e:
        print(f"StageError: {e}", flush=True)
        return 1
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
