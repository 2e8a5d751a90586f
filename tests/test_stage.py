import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import toy_pipeline as toy
from whaleid.pipeline import stage as stagelib
from whaleid.pipeline.stage import StageError

HERE = Path(__file__).parent


@pytest.fixture
def folders(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    (data / "in.txt").write_text("hello")
    toy.CALLS.clear()
    return data, work


def run(work, data, overrides=(), force=()):
    toy.CALLS.clear()
    out = toy.session(work, data, overrides).run(toy.STAGES, set(force))
    return out, list(toy.CALLS)


def test_second_run_is_cached(folders):
    data, work = folders
    out, calls = run(work, data)
    assert out == {"a": "ran", "b": "ran"} and calls == ["a", "b"]
    out, calls = run(work, data)
    assert out == {"a": "cached", "b": "cached"} and calls == []
    m = json.loads((work / "a" / "manifest.json").read_text())
    assert m["counts"]["items"] == 4 and m["settings"] == {"run.seed": 42}
    assert m["artifacts"]["a.pickle"] == stagelib.sha256_file(work / "a" / "a.pickle")


def test_changed_input_reruns_stage_and_downstream(folders):
    data, work = folders
    run(work, data)
    (data / "in.txt").write_text("hello, changed")
    st = toy.session(work, data).status(toy.STAGES[0])
    assert st.state == "stale" and "input in.txt changed" in st.reason
    st_b = toy.session(work, data).status(toy.STAGES[1])
    assert st_b.state == "stale" and "upstream a" in st_b.reason
    out, calls = run(work, data)
    assert calls == ["a", "b"]
    assert json.loads((work / "b" / "b.json").read_text())["length"] == len("hello, changed")


def test_changed_setting_reruns_only_that_stage_and_downstream(folders):
    data, work = folders
    run(work, data)
    out, calls = run(work, data, overrides=["augment.margin=0.2"])
    assert out == {"a": "cached", "b": "ran"}, "a downstream setting must never rerun upstream"
    st = toy.session(work, data).status(toy.STAGES[1])
    assert st.state == "stale" and "augment.margin" in st.reason
    out, calls = run(work, data, overrides=["run.seed=7", "augment.margin=0.2"])
    assert calls == ["a", "b"], "a changed upstream result reruns downstream"


def test_a_setting_added_since_the_run_at_its_default_keeps_the_stage_up_to_date(folders):
    """A manifest written before a setting existed lacks its key: still up to date while the setting
    holds its shipped default (the behaviour it had before), stale at any other value."""
    from whaleid.pipeline import config
    data, work = folders
    run(work, data)
    path = work / "b" / "manifest.json"
    m = json.loads(path.read_text())
    default = config.shipped_default("augment.margin")
    assert m["settings"] == {"augment.margin": default}
    del m["settings"]["augment.margin"]  # as an earlier whaleid, without that setting, wrote it
    path.write_text(json.dumps(m))
    assert toy.session(work, data).status(toy.STAGES[1]).state == "done"
    st = toy.session(work, data, [f"augment.margin={default + 0.05}"]).status(toy.STAGES[1])
    assert st.state == "stale" and "augment.margin changed ('<absent>'" in st.reason
    assert run(work, data)[1] == []


def test_force_reruns_stage_and_everything_downstream(folders):
    data, work = folders
    run(work, data)
    assert run(work, data, force={"a"})[1] == ["a", "b"]
    assert run(work, data, force={"b"})[1] == ["b"]


def test_tampered_pickle_is_refused_never_unpickled(folders, monkeypatch):
    data, work = folders
    run(work, data)
    path = work / "a" / "a.pickle"
    intact = path.read_bytes()
    path.write_bytes(intact[:-5])  # truncated
    st = toy.session(work, data).status(toy.STAGES[0])
    assert st.state == "modified"
    with pytest.raises(StageError, match="--force a"):
        run(work, data)
    # Session.run refuses stage a above, so stage b never reaches its load; the load path itself must
    # refuse too (a stage reading an upstream artifact that changed after the status check): it reads
    # the file through Run.upstream's sha256 check before pickle.load ever sees the bytes
    unpickled = []
    monkeypatch.setattr(pickle, "load", lambda f: unpickled.append(1))
    reader = stagelib.Run(toy.session(work, data), toy.STAGES[1], resume=False)
    with pytest.raises(StageError, match="modified or truncated.*--force a"):
        reader.load_pickle("a", "a.pickle")
    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 0x01  # same size, one bit changed
    path.write_bytes(bytes(flipped))
    with pytest.raises(StageError, match="modified or truncated"):
        reader.load_pickle("a", "a.pickle")
    assert unpickled == []
    monkeypatch.undo()
    path.write_bytes(intact)  # the same path loads the intact file: it was the bytes that were refused
    assert reader.load_pickle("a", "a.pickle")["text"] == "hello"
    path.write_bytes(intact[:-5])
    out, calls = run(work, data, force={"a"})
    assert calls == ["a", "b"] and toy.session(work, data).status(toy.STAGES[1]).done


def test_deleted_artifact_reruns_its_stage(folders):
    data, work = folders
    run(work, data)
    (work / "b" / "b.json").unlink()
    assert run(work, data)[1] == ["b"]


def test_killed_mid_write_leaves_nothing_trusted_and_rerun_completes(folders):
    data, work = folders
    run(work, data)  # a complete earlier result that must not survive a half-finished rerun
    (data / "in.txt").write_text("new input")
    proc = subprocess.Popen([sys.executable, str(HERE / "toy_pipeline.py"), str(work), str(data), "slow"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # inside the artifact write
    proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "a" / "manifest.json").exists()
    assert (work / "a" / ".running.json").exists()
    # the half-written bytes live only in a temp file, never under the artifact's name
    assert not (work / "a" / "a.pickle").exists()
    assert toy.session(work, data).status(toy.STAGES[0]).state == "missing"
    out, calls = run(work, data)
    assert calls == ["a", "b"]
    assert pickle.loads((work / "a" / "a.pickle").read_bytes())["text"] == "new input"


def test_interrupted_stage_resumes_only_with_the_same_fingerprint(folders):
    data, work = folders
    run(work, data)
    m = json.loads((work / "a" / "manifest.json").read_text())
    # simulate a kill after two items: manifest gone, running marker with the same fingerprint
    (work / "a" / "manifest.json").unlink()
    stagelib.write_json(work / "a" / ".running.json", {"settings": m["settings"], "inputs": m["inputs"]})
    for i in (2, 3):
        (work / "a" / "items" / f"{i}.txt").unlink()
    run(work, data)
    m2 = json.loads((work / "a" / "manifest.json").read_text())
    assert m2["resumed"] is True and m2["counts"]["resumed_items"] == 2
    # a different setting must not resume from the old partial work
    (work / "a" / "manifest.json").unlink()
    stagelib.write_json(work / "a" / ".running.json", {"settings": m["settings"], "inputs": m["inputs"]})
    run(work, data, overrides=["run.seed=1"])
    assert json.loads((work / "a" / "manifest.json").read_text())["resumed"] is False


def test_lock_refuses_a_second_run_and_takes_over_a_dead_one(tmp_path):
    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; sys.path.insert(0, sys.argv[1]);"
                               "from whaleid.pipeline.stage import work_lock\n"
                               "with work_lock(sys.argv[2], 'holder'):\n print('locked', flush=True); time.sleep(60)",
                               str(HERE.parent), str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageError, match=f"pid {holder.pid}"):
            with stagelib.work_lock(work, "second"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is taken over
    assert (work / stagelib.LOCK).exists()
    with stagelib.work_lock(work, "third"):
        assert json.loads((work / stagelib.LOCK).read_text())["pid"] == os.getpid()
    assert not (work / stagelib.LOCK).exists()


def test_atomic_path_leaves_no_partial_file_on_error(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with stagelib.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_folder_digest_sees_changed_and_added_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    d1 = stagelib.digest_folder(tmp_path)
    (tmp_path / "b.jpg").write_bytes(b"2")
    d2 = stagelib.digest_folder(tmp_path)
    time.sleep(0.01)
    (tmp_path / "a.jpg").write_bytes(b"11")
    d3 = stagelib.digest_folder(tmp_path)
    assert len({d1, d2, d3}) == 3


def test_folder_fingerprint_sees_a_same_size_change_and_a_deletion(tmp_path):
    """Behaviour through the public fingerprint(), whatever it hashes: a photo edited in place to the
    same size and a deleted photo, also one in a subfolder, must each change the folder's fingerprint."""
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg"):
        (tmp_path / name).write_bytes(b"1234")
    seen = [stagelib.fingerprint(tmp_path)]
    time.sleep(0.05)  # an edit lands at a later time, as it would in use
    (tmp_path / "a.jpg").write_bytes(b"1235")
    seen.append(stagelib.fingerprint(tmp_path))
    for name in ("b.jpg", "sub/d.jpg"):  # the last name of each folder
        (tmp_path / name).unlink()
        seen.append(stagelib.fingerprint(tmp_path))
    assert len(set(seen)) == len(seen) == 4, seen
    assert stagelib.fingerprint(tmp_path) == seen[-1]  # and it is stable while nothing changes


def test_folder_fingerprint_sees_a_same_size_edit_that_keeps_the_mtime(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"1234")
    before = stagelib.fingerprint(tmp_path)
    st = p.stat()
    p.write_bytes(b"4321")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p, rsync -t or a bucket sync may leave it
    assert stagelib.fingerprint(tmp_path) != before
