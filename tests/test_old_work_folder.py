"""A work folder made by whaleid before its modules moved into subpackages stays up to date after
the move: fingerprints name stages, settings and contents, never module paths, and a model saved by
the old code loads in the new one (its layers are registered by name, not by module)."""
import io
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from conftest import ROOT, cli

FLAT_LAYOUT = "3957305"  # the last commit of the flat whaleid/*.py layout
TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=1", "--set", "train.batch_size=16", "--quiet"]


@pytest.fixture
def flat_layout_code(tmp_path):
    """The pre-move package, from this checkout's git history (a source archive without history skips)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the pre-move code comes from git history")
    have = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{FLAT_LAYOUT}^{{commit}}"], capture_output=True)
    if have.returncode:
        pytest.skip(f"commit {FLAT_LAYOUT} (the flat layout) is not in this clone's history (a shallow clone?)")
    archive = subprocess.run(["git", "-C", ROOT, "archive", FLAT_LAYOUT, "whaleid", "configs"],
                             capture_output=True, check=True).stdout
    old = tmp_path / "flat"
    old.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old, filter="data")
    return old


def test_a_work_folder_from_the_flat_layout_is_up_to_date_after_the_move(tiny_set, tmp_path, flat_layout_code):
    env = {**os.environ, "PYTHONPATH": str(flat_layout_code)}
    probe = subprocess.run([sys.executable, "-c", "import whaleid.stage, whaleid; print(whaleid.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.returncode == 0 and str(flat_layout_code) in probe.stdout, probe.stdout + probe.stderr
    work = tmp_path / "work"
    old = subprocess.run([sys.executable, "-m", "whaleid.cli", "predict", "--data", tiny_set, "--work", work, *TINY],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert old.returncode == 0, old.stdout + old.stderr
    before = (work / "submission.csv").read_bytes()

    code, out = cli("status", "--work", work)
    states = {l.split()[0]: l.split()[1] for l in out.splitlines() if l and not l.startswith(" ")}
    stages = ("dedup", "format", "boxes", "augment", "split", "train", "predict")
    assert [states.get(s) for s in stages] == ["done"] * len(stages), out
    code, out = cli("predict", "--work", work)
    assert code == 0 and "running" not in out and out.count("up to date (cached)") == len(stages), out
    assert (work / "submission.csv").read_bytes() == before
    # the new code loads the model the old code saved (evaluate never ran: it runs now, on that model)
    code, out = cli("evaluate", "--work", work)
    assert code == 0 and "[evaluate] running" in out and "[train] up to date" in out, out
    assert len(pd.read_csv(work / "evaluate/val_predictions.csv")) > 0
