"""The stage cache on a real (tiny synthetic) data folder, through the command line: a train/ or test/
photo edited or deleted reruns dedup .. predict and ends where a from-scratch run on the changed data
ends; an upstream stage that reruns and writes identical artifacts leaves everything downstream cached."""
import hashlib
import json
import shutil
import zipfile

import pytest
from PIL import Image, ImageDraw

from conftest import ROOT, whaleid

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
FAST = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=3", "--set", "train.patience=3", "--set", "train.batch_size=16", "--quiet"]
STAGES = ["dedup", "format", "boxes", "augment", "split", "train", "predict"]


@pytest.fixture(scope="module")
def base(tiny_set, tmp_path_factory):
    """A copy of tiny_set (mtimes kept) and a work folder run through predict on it."""
    root = tmp_path_factory.mktemp("cache_data")
    data = root / "data"
    shutil.copytree(tiny_set, data)
    work = root / "work"
    whaleid("predict", "--data", data, "--work", work, *FAST)
    return data, work


def digest(path):
    """sha256 of a file (a Keras model: of its weights; the zip also holds a save date), or of every
    file's name and sha256 in a folder."""
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                h.update(f"{p.relative_to(path)}\0{digest(p)}\n".encode())
        return h.hexdigest()
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as z:
            return hashlib.sha256(z.read("model.weights.h5")).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifacts(work):
    """{stage/artifact: content digest} of every stage's recorded artifacts, and WORK/submission.csv."""
    out = {"submission.csv": digest(work / "submission.csv")}
    for stage in STAGES:
        m = json.loads((work / stage / "manifest.json").read_text())
        for name in m["artifacts"]:
            if (stage, name) != ("train", "MODEL_TIME.pickle"):  # wall time
                out[f"{stage}/{name}"] = digest(work / stage / name)
    return out


def ran(out):
    return [s for s in STAGES if f"[{s}] running" in out]


def _edit(photo):
    with Image.open(photo) as im:
        im = im.convert(im.mode)
    ImageDraw.Draw(im).rectangle([0, 0, im.width // 3, im.height // 3], fill="white" if im.mode == "RGB" else 255)
    im.save(photo, "JPEG", quality=90)


@pytest.mark.parametrize("change, folder", [("edit", "train"), ("edit", "test"), ("delete", "train"),
                                           ("delete", "test")])
def test_a_changed_photo_reruns_dedup_to_predict_and_matches_a_fresh_run(base, tmp_path, change, folder):
    data0, work0 = base
    data, work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(data0, data)
    shutil.copytree(work0, work)
    assert ran(whaleid("predict", "--work", work, "--data", data, "--quiet")) == [], "the copies are up to date"
    photo = sorted((data / folder).iterdir())[3]
    _edit(photo) if change == "edit" else photo.unlink()
    out = whaleid("predict", "--work", work, "--data", data, "--quiet")
    stages = ran(out)
    print(f"{change} {folder}/{photo.name}: reran {stages}")
    assert stages[0] == "dedup" and stages[-1] == "predict", out
    assert "[dedup] running (input " in out and f"{folder}/ changed" in out
    if folder == "train":  # what reads train/ reruns, and the model retrains on the changed photos
        assert {"boxes", "augment", "split", "train"} <= set(stages), out
    fresh = tmp_path / "fresh"
    whaleid("predict", "--work", fresh, "--data", data, *FAST)
    now, want = artifacts(work), artifacts(fresh)
    assert now == want, [k for k in want if now.get(k) != want[k]]
    assert now != artifacts(work0), "the change reached the artifacts"
    if change == "delete":
        skipped = (work / "dedup" / "skipped.csv").read_text()
        assert photo.name in skipped and "does not exist" in skipped


def test_an_upstream_rerun_with_identical_artifacts_leaves_downstream_cached(base, tmp_path):
    data0, work0 = base
    work = tmp_path / "work"
    shutil.copytree(work0, work)
    before = artifacts(work)
    # a dedup setting that changes no decision on this set: dedup reruns, writes the same artifacts
    out = whaleid("predict", "--work", work, "--data", data0, "--set", "dedup.verify_mse=0.11", "--quiet")
    assert ran(out) == ["dedup"], out
    assert "[dedup] running (setting dedup.verify_mse changed" in out
    for stage in STAGES[1:]:
        assert f"[{stage}] up to date (cached)" in out
    assert artifacts(work) == before
    m = json.loads((work / "dedup" / "manifest.json").read_text())
    assert m["settings"]["dedup.verify_mse"] == 0.11
