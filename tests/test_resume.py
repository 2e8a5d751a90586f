"""Per-photo stages resume after a kill (issue 16, point 2): Run.map_resumable commits results in chunks
(WORK/<stage>/.partial/), a rerun with the same fingerprint keeps them, and the final artifacts equal
an uninterrupted run's. The SIGKILL tests run the real command line in a process group and kill all of
it, as a pre-empted VM would."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from whaleid.pipeline import config
from whaleid.pipeline.stage import PARTIAL, Session, Stage

from conftest import ROOT, whaleid

CPU = str(ROOT / "configs/scratch.toml")


# ---------------------------------------------------------------- the mechanism, on a toy stage

CALLS: list[int] = []


def square(x):
    CALLS.append(x)
    return x * x


class Stop(Exception):
    pass


def toy(stop_after: int | None = None, chunk: int = 4):
    def run(run):
        out = []
        for i, y in enumerate(run.map_resumable(square, range(40), "squares", key=str, chunk=chunk)):
            if stop_after is not None and i == stop_after:
                raise Stop  # the stage dies here, as a killed run would
            out.append(y)
        run.write_json("out.json", out)
        return {"n": len(out)}
    return Stage("toy", run, artifacts=("out.json",), settings=("run.seed",))


def session(work, stage, overrides=()):
    return Session(cfg=config.load(None, tuple(overrides)), work=Path(work), data=None, stages=[stage],
                   echo=lambda m: None)


def killed(work, stop_after, overrides=()):
    stage = toy(stop_after=stop_after)
    with pytest.raises(Stop):
        session(work, stage, overrides).run([stage])


def test_a_stage_killed_part_way_keeps_its_committed_chunks(tmp_path):
    CALLS.clear()
    killed(tmp_path, 13)
    assert sorted(p.name for p in (tmp_path / "toy" / PARTIAL).iterdir())[:3] == \
        ["squares-00000.pickle", "squares-00001.pickle", "squares-00002.pickle"]
    first = list(CALLS)
    CALLS.clear()
    s = session(tmp_path, toy())
    s.run([toy()])
    m = s.manifest("toy")
    assert m["resumed"] and m["partial"]["squares"] == {"items": 40, "chunk": 3, "chunks": 14, "kept": 5,
                                                         "computed": 9}
    assert first == list(range(15))              # in one process a chunk is committed before its first result
    assert CALLS == list(range(15, 40))          # is used: chunks 0-4 (items 0-14) were kept
    assert json.loads((tmp_path / "toy" / "out.json").read_text()) == [x * x for x in range(40)]
    assert not (tmp_path / "toy" / PARTIAL).exists(), "the chunks go once the manifest is written"


def test_committed_chunks_of_another_fingerprint_or_damaged_are_not_used(tmp_path):
    killed(tmp_path, 20)
    partial = tmp_path / "toy" / PARTIAL
    (partial / "squares-00001.pickle").write_bytes(b"garbage")
    CALLS.clear()
    s = session(tmp_path, toy())
    s.run([toy()])
    assert s.manifest("toy")["partial"]["squares"]["kept"] == 6  # of 7 committed, one damaged
    assert CALLS == [3, 4, 5] + list(range(21, 40))
    # a kill, then a rerun with another setting: nothing of the killed run is used
    (tmp_path / "toy" / "manifest.json").unlink()
    killed(tmp_path, 20)
    CALLS.clear()
    s = session(tmp_path, toy(), ["run.seed=1"])
    s.run([toy()])
    assert not s.manifest("toy")["resumed"] and CALLS == list(range(40))


def test_a_chunk_written_for_other_items_is_not_used(tmp_path):
    """Chunks are checked against their items' keys, not just their number."""
    killed(tmp_path, 20)
    CALLS.clear()
    s = session(tmp_path, toy(chunk=2))  # other chunk boundaries, same fingerprint
    s.run([toy(chunk=2)])
    assert s.manifest("toy")["partial"]["squares"]["kept"] == 0 and sorted(CALLS) == list(range(40))


# ---------------------------------------------------------------- SIGKILL inside the real stages

LOGGED = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
log, slow = sys.argv[2], float(sys.argv[3])
from whaleid.preprocess import boxes
real = boxes.detect_box_file
def logged(path, **kw):  # every photo a worker starts on, appended to the log before the work
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (os.path.basename(path) + "\n").encode())
    os.close(fd)
    time.sleep(slow)
    return real(path, **kw)
boxes.detect_box_file = logged
from whaleid.cli import main
main(sys.argv[4:], standalone_mode=True)
"""


def artifacts(work: Path, stages) -> dict:
    """sha256 of every file of the stages' folders but the manifest (its times differ)."""
    out = {}
    for s in stages:
        for p in sorted((work / s).rglob("*")):
            if p.is_file() and p.name != "manifest.json":
                out[str(p.relative_to(work))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def preprocess_args(data, work, workers=2):
    return ["preprocess", "--data", str(data), "--work", str(work), "--config", CPU, "--quiet",
            "--workers", str(workers)]


def start(args, log=None, slow=0.0, env=None):
    cmd = ([sys.executable, "-c", LOGGED, str(ROOT), str(log), str(slow)] if log else
           [sys.executable, "-m", "whaleid.cli"]) + args
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, as a pre-empted VM
    except ProcessLookupError:
        pass
    proc.wait()


def test_sigkill_inside_boxes_redoes_at_most_one_chunk_per_worker(tiny_set, tmp_path):
    reference = tmp_path / "reference"
    whaleid(*preprocess_args(tiny_set, reference))
    work, workers = tmp_path / "work", 2
    killed_log, rerun_log = tmp_path / "killed.log", tmp_path / "rerun.log"
    proc = start(preprocess_args(tiny_set, work, workers), killed_log, slow=0.05)
    partial = work / "boxes" / PARTIAL
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.is_dir() and len(list(partial.glob("*.pickle"))) >= 4:
            break
        time.sleep(0.01)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    committed = len(list(partial.glob("*.pickle")))
    assert committed >= 4 and not (work / "boxes" / "manifest.json").exists()

    proc = start(preprocess_args(tiny_set, work, workers), rerun_log)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "[dedup] up to date" in out and "[format] up to date" in out and "[boxes] running" in out
    m = json.loads((work / "boxes" / "manifest.json").read_text())
    train = m["partial"]["train boxes"]
    assert m["resumed"] and train["kept"] == committed, (m["partial"], committed)
    started_before = killed_log.read_text().split()
    redone = set(started_before) & set(rerun_log.read_text().split())
    assert len(redone) <= workers * train["chunk"], (len(redone), train)
    assert len(rerun_log.read_text().split()) == m["partial"]["test boxes"]["items"] + train["items"] \
        - sum(min(train["chunk"], train["items"] - i * train["chunk"]) for i in range(committed))
    assert artifacts(work, ["boxes", "augment", "split"]) == artifacts(reference, ["boxes", "augment", "split"])
    assert not partial.exists() and not list(work.rglob(".*.tmp"))


@pytest.mark.parametrize("stage", ["dedup", "augment"])
def test_killed_inside_dedup_or_augment_resumes_with_identical_artifacts(tiny_set, tmp_path, stage):
    """The parent process dies right after committing its second chunk (fault point <stage>.chunk);
    its workers go with it. The rerun keeps the committed chunks and ends where a clean run ends."""
    reference = tmp_path / "reference"
    whaleid(*preprocess_args(tiny_set, reference))
    work = tmp_path / "work"
    proc = start(preprocess_args(tiny_set, work), env={"WHALEID_FAULT": f"{stage}.chunk@2"})
    proc.communicate(timeout=300)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (work / stage / "manifest.json").exists() and len(list((work / stage / PARTIAL).glob("*"))) >= 2
    out = whaleid(*preprocess_args(tiny_set, work))
    assert f"[{stage}] running (interrupted run" in out and "kept from the interrupted run" in out, out
    m = json.loads((work / stage / "manifest.json").read_text())
    first = next(iter(m["partial"].values()))
    assert m["resumed"] and first["kept"] >= 2 and first["computed"] == first["chunks"] - first["kept"]
    stages = ["dedup", "format", "boxes", "augment", "split"]
    assert artifacts(work, stages) == artifacts(reference, stages)
