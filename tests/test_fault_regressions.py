"""Regressions for what scripts/fault_injection.py (make faults) found: each failure it reported gets
a fast, deterministic reproduction here."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import toy_pipeline as toy

HERE = Path(__file__).parent


def test_a_resumed_stage_leaves_no_temp_file_of_the_killed_write(tmp_path):
    """SIGKILL inside an atomic write leaves its temp file (.a.pickle.XXXX.tmp; nothing can delete it
    in the killed process). A rerun with the same fingerprint resumes in the same folder, so unless the
    cache clears such files they stay forever: a train checkpoint's temp file is the size of the model
    and its optimizer state, one more per pre-emption."""
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    (data / "in.txt").write_text("hello")
    proc = subprocess.Popen([sys.executable, str(HERE / "toy_pipeline.py"), str(work), str(data), "slow"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # inside the artifact's atomic write
    proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in (work / "a").iterdir() if p.name.endswith(".tmp")]
    assert left, "the kill should have landed inside the write (a temp file beside a.pickle)"

    toy.session(work, data).run(toy.STAGES)
    manifest = json.loads((work / "a" / "manifest.json").read_text())
    assert manifest["resumed"] is True  # same fingerprint: the stage resumed in its folder ...
    assert not [p.name for p in (work / "a").rglob("*.tmp")]  # ... and cleared the dead write's temp file
    assert (work / "a" / "a.pickle").is_file() and (work / "a" / "items").is_dir()
