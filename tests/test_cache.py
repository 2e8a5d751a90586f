"""The portable, content-addressed cache (issue 16, points 1 and 8): fingerprints are content hashes,
remembered by stat in WORK/.whaleid_state; a work folder copied with cp -r (or its data folder at
another path) is up to date, a touched photo reruns nothing, changed pixels rerun exactly the stages
that read them; artifacts follow the umask."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import toy_pipeline as toy
from whaleid.pipeline import fingerprints
from whaleid.pipeline.fingerprints import HashState, digest_folder, fingerprint, legacy_digest_folder
from whaleid.pipeline.stage import STATE
from whaleid.stages import ALL

from conftest import ROOT, cli, whaleid

TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=2", "--set", "train.batch_size=16", "--quiet"]
ORDER = [s.name for s in ALL]
PREDICT_NEEDS = [s for s in ORDER if s not in ("evaluate", "keypoints", "test_keypoints", "background")]  # (no re-ranking, no train.background)


# ---------------------------------------------------------------- fingerprints and the stat cache

@pytest.fixture
def counted(monkeypatch):
    """Paths whose bytes were read to be hashed."""
    read = []
    real = fingerprints._hash_or_error
    monkeypatch.setattr(fingerprints, "_hash_or_error", lambda p: (read.append(Path(p).name), real(p))[1])
    return read


@pytest.fixture
def settled(monkeypatch):
    """Files count as written long ago (a file changed within RACY_NS of its hashing is not remembered,
    and a test would wait 2 s for its ctime to age)."""
    monkeypatch.setattr(fingerprints, "RACY_NS", 0)


def test_a_folder_fingerprint_is_its_content_not_its_place_or_times(tmp_path):
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    (a / "sub").mkdir(parents=True)
    for name, data in (("x.jpg", b"1"), ("sub/y.jpg", b"22"), (".hidden", b"h")):
        (a / name).write_bytes(data)
    cp_r(a, b)
    os.utime(b / "x.jpg", (1, 1))
    assert fingerprint(a) == fingerprint(b) == digest_folder(a) and fingerprint(a).startswith("tree:")
    (b / ".hidden").write_bytes(b"other")  # dot files are not content
    assert fingerprint(b) == fingerprint(a)
    (b / "x.jpg").write_bytes(b"2")
    assert fingerprint(b) != fingerprint(a)
    assert fingerprint(a / "x.jpg") == fingerprints.sha256_file(a / "x.jpg") and fingerprint(tmp_path / "no") is None


def test_the_stat_cache_reads_unchanged_files_once(tmp_path, counted, settled):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(20):
        (photos / f"{i}.jpg").write_bytes(bytes([i]) * 1000)
    state = HashState(tmp_path / STATE)
    first = digest_folder(photos, state)
    assert len(counted) == 20
    state.close()
    counted.clear()
    again = HashState(tmp_path / STATE)  # a later command: read from the file
    assert digest_folder(photos, again) == first and counted == [] and again.hits == 20
    os.utime(photos / "3.jpg")  # touched: read again, same fingerprint
    assert digest_folder(photos, again) == first and counted == ["3.jpg"]
    counted.clear()
    # a same-size edit whose mtime is put back (cp -p, rsync -t): the ctime still tells
    st = (photos / "5.jpg").stat()
    (photos / "5.jpg").write_bytes(b"\xff" * 1000)
    os.utime(photos / "5.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = digest_folder(photos, again)
    assert changed != first and counted == ["5.jpg"]
    assert changed == digest_folder(photos)  # the same as without a cache
    again.close()


def test_a_lost_or_corrupt_state_costs_a_rehash_never_a_wrong_answer(tmp_path, counted, settled):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        (photos / f"{i}.jpg").write_bytes(bytes([i]) * 10)
    state = HashState(tmp_path / STATE)
    first = digest_folder(photos, state)
    state.close()
    (tmp_path / STATE).write_bytes(b"this is not a database" * 100)
    counted.clear()
    assert digest_folder(photos, HashState(tmp_path / STATE)) == first and len(counted) == 5
    (tmp_path / STATE).unlink()
    assert digest_folder(photos, HashState(tmp_path / STATE)) == first


def test_a_file_changed_moments_before_it_was_hashed_is_not_remembered(tmp_path, counted):
    p = tmp_path / "fresh.jpg"
    p.write_bytes(b"1234")
    state = HashState(tmp_path / STATE)
    fingerprints.file_digest(p, state)
    fingerprints.file_digest(p, state)
    assert counted == ["fresh.jpg", "fresh.jpg"]  # within the timestamp granularity: hashed again


def test_many_files_are_hashed_in_parallel_and_reported(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2100):
        (photos / f"{i:05d}.jpg").write_bytes(str(i).encode())
    lines = []
    assert digest_folder(photos, HashState(None), workers=2, report=lines.append) == digest_folder(photos)
    assert len(lines) == 1 and "hashed 2,100 files" in lines[0] and "MB/s" in lines[0]


def test_a_work_folder_of_an_earlier_whaleid_stays_up_to_date(tmp_path):
    """Manifests written with the earlier folder fingerprint (names, sizes, mtimes) are honoured."""
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    (data / "in.txt").write_text("hello")
    toy.session(work, data).run(toy.STAGES)
    m = json.loads((work / "a" / "manifest.json").read_text())
    m["artifacts"]["items"] = legacy_digest_folder(work / "a" / "items")
    (work / "a" / "manifest.json").write_text(json.dumps(m))
    mb = json.loads((work / "b" / "manifest.json").read_text())
    mb["inputs"]["stage/a"] = m["artifacts"]
    (work / "b" / "manifest.json").write_text(json.dumps(mb))
    s = toy.session(work, data)
    assert [s.status(st).state for st in toy.STAGES] == ["done", "done"]
    (work / "a" / "items" / "0.txt").write_text("changed!")
    assert s.status(toy.STAGES[0]).state == "modified"


# ---------------------------------------------------------------- the pipeline: copies, touches, pixels

@pytest.fixture(scope="module")
def trained(tiny_set, tmp_path_factory):
    """A data folder (a copy of the tiny set) and a work folder through predict."""
    root = tmp_path_factory.mktemp("cache")
    data, work = root / "data", root / "work"
    shutil.copytree(tiny_set, data)
    whaleid("predict", "--data", data, "--work", work, *TINY)
    return data, work


def manifests(work: Path) -> dict:
    return {s: json.loads((work / s / "manifest.json").read_text()) for s in ORDER
            if (work / s / "manifest.json").exists()}


def ran(output: str) -> list[str]:
    return [s for s in ORDER if f"[{s}] running" in output]


def cp_r(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)  # new inodes and times, as a sync would
    return dst


def test_a_work_folder_copied_with_cp_r_predicts_without_recomputation(trained, tmp_path):
    data, work = trained
    data2, work2 = cp_r(data, tmp_path / "moved" / "data"), cp_r(work, tmp_path / "moved" / "work")
    out = whaleid("predict", "--work", work2, "--data", data2)
    assert ran(out) == [] and out.count("up to date (cached)") == len(PREDICT_NEEDS), out
    assert "modified or truncated" not in out
    code, status = cli("status", "--work", work2)
    states = {line.split()[0]: line.split()[1] for line in status.splitlines() if line.split()[0] in ORDER}
    assert code == 0 and [states[s] for s in PREDICT_NEEDS] == ["done"] * 7, status
    assert json.loads((work2 / "whaleid.json").read_text())["data"] == str(data2.resolve())


def test_an_augment_images_folder_copied_with_cp_r_then_predict_runs_nothing(trained, tmp_path):
    data, work = trained
    work2 = cp_r(work, tmp_path / "work")
    shutil.rmtree(work2 / "augment" / "images")
    cp_r(work / "augment" / "images", work2 / "augment" / "images")
    for p in (work2 / "augment" / "images").iterdir():
        os.utime(p, (1e9, 1e9))
    out = whaleid("predict", "--work", work2)
    assert ran(out) == [] and "[augment] up to date" in out and "[train] up to date" in out, out


def test_touching_every_photo_reruns_nothing(trained, tmp_path):
    data, work = trained
    data2, work2 = cp_r(data, tmp_path / "data"), cp_r(work, tmp_path / "work")
    for p in list((data2 / "train").iterdir()) + list((data2 / "test").iterdir()):
        os.utime(p)
    out = whaleid("predict", "--work", work2, "--data", data2)
    assert ran(out) == [], out


def test_changed_pixels_rerun_exactly_the_stages_that_read_them(trained, tmp_path):
    """One test photo's pixels change (same name, same size in pixels): the stages that read test/
    rerun, and downstream exactly those whose recorded upstream artifacts changed; never train."""
    data, work = trained
    data2, work2 = cp_r(data, tmp_path / "data"), cp_r(work, tmp_path / "work")
    photo = sorted((data2 / "test").iterdir())[0]
    img = np.asarray(Image.open(photo).convert("RGB")).copy()
    img[: img.shape[0] // 3, : img.shape[1] // 3] = 255
    Image.fromarray(img).save(photo, "JPEG", quality=90)
    before = manifests(work2)
    out = whaleid("predict", "--work", work2, "--data", data2)
    after = manifests(work2)
    expected = set()
    for s in (s for s in ALL if s.name in PREDICT_NEEDS + ["predict"]):
        if "test/" in s.data or any(u in expected and after[u]["artifacts"] != before[s.name]["inputs"][f"stage/{u}"]
                                    for u in s.upstream):
            expected.add(s.name)
    assert set(ran(out)) == expected and {"dedup", "boxes", "predict"} <= expected and "train" not in expected, out
    assert "[train] up to date" in out


def test_missing_test_photos_are_a_loud_warning_at_predict_and_strict_an_error(trained, tmp_path):
    data, work = trained
    data2, work2 = cp_r(data, tmp_path / "data"), cp_r(work, tmp_path / "work")
    gone = sorted((data2 / "test").iterdir())[:2]
    for p in gone:
        p.unlink()
    code, out = cli("predict", "--work", work2, "--data", data2, "--strict")
    assert code == 1 and "2 of" in out and "test photos are missing or unreadable" in out, out
    assert "Traceback" not in out and "[predict] running" not in out
    assert f"{work2 / 'dedup' / 'skipped.csv'}" in out
    code, out = cli("predict", "--work", work2, "--data", data2)
    assert code == 0 and "WARNING: 2 of" in out and "are guesses" in out and "predictions.csv" in out, out


def test_artifacts_follow_the_umask(trained):
    """0644 under the usual umask 022, not mkstemp's 0600: a teammate can read a shared work folder."""
    data, work = trained
    mask = os.umask(0o022)
    os.umask(mask)
    for p in [work / "whaleid.json", work / "submission.csv", work / STATE] + [
            p for s in PREDICT_NEEDS for p in (work / s).iterdir() if p.is_file()]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_atomic_writes_follow_a_group_writable_umask(tmp_path):
    from whaleid.pipeline.files import write_json
    old_mask = os.umask(0o002)
    try:
        write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old_mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o664


def test_predict_killed_while_scoring_resumes_after_its_last_committed_chunk(trained, tmp_path):
    """predict commits its test photos' answers in chunks of whole batches (predict/.partial/); killed
    after the second chunk, the rerun scores only the rest and writes what an uninterrupted run writes."""
    import signal
    import sys
    data, work = trained
    small = ["--set", "predict.batch_size=2"]  # chunks of 2 photos: several chunks on the tiny set
    clean = cp_r(work, tmp_path / "clean")
    whaleid("predict", "--work", clean, *small)
    killed = cp_r(work, tmp_path / "killed")
    env = {**os.environ, "WHALEID_FAULT": "predict.chunk@2"}
    proc = subprocess.run([sys.executable, "-m", "whaleid.cli", "predict", "--work", str(killed), *small, "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert len(list((killed / "predict" / ".partial").iterdir())) == 2
    out = whaleid("predict", "--work", killed, *small)
    m = json.loads((killed / "predict" / "manifest.json").read_text())
    assert m["resumed"] and m["partial"]["tta"]["kept"] == 2 and "2 of" in out and "kept from the interrupted run" in out
    for name in ("submission.csv", "predictions.csv"):
        assert (killed / "predict" / name).read_bytes() == (clean / "predict" / name).read_bytes()


def test_hashes_learnt_before_the_work_folder_exists_are_kept(tmp_path, counted, settled):
    """A session fingerprints its data before the run creates WORK: those hashes reach WORK/.whaleid_state."""
    from whaleid.pipeline import config
    from whaleid.pipeline.stage import Session
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(bytes([i]) * 10)
    s = Session(cfg=config.load(None), work=tmp_path / "work", data=None, stages=[], echo=lambda m: None)
    first = s.fingerprint(photos)
    (tmp_path / "work").mkdir()
    assert s.fingerprint(photos) == first and len(counted) == 3
    s.close()
    counted.clear()
    assert digest_folder(photos, HashState(tmp_path / "work" / STATE)) == first and counted == []


def test_box_detector_weights_are_an_input_of_boxes_by_content(tmp_path):
    """The cnn detector's fitted weights (box_head_weights.py) fingerprint the boxes stage: weights
    refitted into that file rerun boxes; with another detector they are no input at all."""
    import dataclasses
    from whaleid.pipeline import config
    from whaleid import stages
    from whaleid.pipeline.stage import Session
    weights = tmp_path / "box_head_weights.py"
    weights.write_text("W = (1.0,)\n")
    real = stages._box_model

    def session(detector):
        cfg = config.load(None, [f"boxes.detector={detector}"])
        return Session(cfg=cfg, work=tmp_path / "work", data=tmp_path / "data", stages=list(ALL), echo=lambda m: None)

    shipped = real(session("cnn"))["box_head_weights.py"]
    assert shipped.name == "box_head_weights.py" and shipped.is_file()
    # the same rule, on a copy of the file (the package's own is not edited)
    boxes = dataclasses.replace(stages.BOXES, extra_inputs=lambda s: {k: weights for k in real(s)})
    s = session("cnn")
    before = s.inputs_of(boxes)
    assert "file/box_head_weights.py" in before
    weights.write_text("W = (2.0,)\n")
    s2 = session("cnn")
    assert s2.inputs_of(boxes)["file/box_head_weights.py"] != before["file/box_head_weights.py"]
    assert "file/box_head_weights.py" in session("cnn").inputs_of(stages.BOXES)
    assert "file/box_head_weights.py" not in session("dark").inputs_of(stages.BOXES)
    for x in (s, s2):
        x.close()
