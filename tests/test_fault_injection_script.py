"""scripts/fault_injection.py (make faults) scores its own kills honestly: a kill that did not land is
NOT KILLED, never PASS; kills are anchored on the stage's marker file or a fault point, not on log
wording; the kills per stage are reported. Fast: no pipeline runs, stand-in commands."""
import importlib.util
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fi():
    spec = importlib.util.spec_from_file_location("fault_injection_under_test", ROOT / "scripts/fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up while being defined)
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_kill_that_did_not_land_is_not_killed_never_pass(fi):
    row = lambda **kw: fi.Row("kill x #1", "", "none", "none", **kw)
    assert row(ok=True, stage="train", landed=None).result == "NOT KILLED"
    assert row(ok=True, stage="train", landed="train").result == "PASS"
    assert row(ok=True, stage="train", landed="between stages").result == "PASS"
    assert row(ok=False, stage="train", landed=None).result == "FAIL"  # a failed check stays a failure
    assert row(ok=True).result == "PASS" and row(ok=False).result == "FAIL"  # cases that kill nothing


def test_kills_per_stage_are_counted_and_a_stage_no_kill_reached_is_named(fi, monkeypatch, capsys):
    monkeypatch.setattr(fi, "ORDER", ["dedup", "format", "train"])
    row = lambda stage, landed: fi.Row("kill", "", "", "", True, stage=stage, landed=landed)
    suite = type("S", (), {})()
    suite.rows = [row("dedup", "dedup"), row("dedup", None), row("format", "between stages"),
                  row("format", None), row("train", "train"), fi.Row("corrupt", "", "", "", True)]
    holes = fi.Suite.kills_per_stage(suite)
    out = capsys.readouterr().out
    assert holes == ["format"] and "no kill landed in: format" in out
    lines = {line.split()[0]: line.split("|") for line in out.splitlines() if line.startswith("  ")}
    assert [int(c) for c in lines["dedup"][0].split()[1:]] + [int(c) for c in lines["dedup"][1:]] == [2, 1, 0, 1]
    assert [int(c) for c in lines["format"][1:]] == [0, 1, 1]


def _runner(fi, tmp_path, monkeypatch, script):
    """A Runner whose 'whaleid' is a stand-in Python script (it ignores the arguments it is given)."""
    monkeypatch.setattr(fi, "whaleid_cmd", lambda: [sys.executable, "-c", script])
    monkeypatch.setattr(fi, "CODE", tmp_path)
    return fi.Runner(tmp_path, tmp_path / "cpu.toml", 1, 1)


STAND_IN = """
import os, signal, sys, time, pathlib
marker = pathlib.Path(os.environ["MARKER"])
if os.environ.get("WHALEID_FAULT") == "x.point":
    os.kill(os.getpid(), signal.SIGKILL)   # what files.fault_point does
time.sleep(float(os.environ.get("BEFORE", "0")))
marker.parent.mkdir(parents=True, exist_ok=True)
marker.write_text("{}")
print("some output that says nothing anyone anchors on", flush=True)
time.sleep(float(os.environ.get("AFTER", "0")))
"""


def test_kills_are_anchored_on_the_marker_file_and_fault_points_and_detected(fi, tmp_path, monkeypatch):
    marker = tmp_path / "w" / "stage" / ".running.json"
    monkeypatch.setenv("MARKER", str(marker))
    r = _runner(fi, tmp_path, monkeypatch, STAND_IN)
    # the marker appears after 0.3 s; the kill comes 0.2 s after it, long before the command's end
    monkeypatch.setenv("BEFORE", "0.3")
    monkeypatch.setenv("AFTER", "30")
    t = time.monotonic()
    res = r.run("predict", tmp_path / "w", tmp_path, kill_after=(marker, 0.2))
    assert res.killed and res.code is None and 0.45 < time.monotonic() - t < 10
    # a command that ends before its kill moment: not killed, and says so
    marker.unlink()
    monkeypatch.setenv("BEFORE", "0")
    monkeypatch.setenv("AFTER", "0")
    res = r.run("predict", tmp_path / "w", tmp_path, kill_after=(marker, 5.0))
    assert not res.killed and res.code == 0
    # a fault point: the command kills itself; seen as killed, its exit code kept
    res = r.run("predict", tmp_path / "w", tmp_path, fault="x.point")
    assert res.killed and res.code == -signal.SIGKILL
    res = r.run("predict", tmp_path / "w", tmp_path, fault="y.other")
    assert not res.killed and res.code == 0
