"""Re-ranking in the pipeline (issue 23): the rerank settings rerun evaluate and predict and nothing
upstream, the fusion predict applies is evaluate's (fitted on validation, not on test photos), and a
killed keypoints stage resumes from its committed chunks."""
import json
import signal

import numpy as np
import pandas as pd
import pytest

from whaleid.pipeline.stage import PARTIAL
from whaleid.report import match_pairs, page as report

from conftest import ROOT, cli, whaleid
from test_resume import artifacts, kill_group, preprocess_args, start

TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=2", "--set", "train.batch_size=16", "--quiet"]
LOCAL = ["--set", "rerank.method=local"]
UPSTREAM = ("dedup", "format", "boxes", "augment", "split", "keypoints", "train")


def test_rerank_settings_rerun_evaluate_and_predict_only(tiny_set, tmp_path):
    work = tmp_path / "work"
    whaleid("train", "--data", tiny_set, "--work", work, *TINY)
    out = whaleid("evaluate", "--work", work, *TINY, *LOCAL)
    assert "[keypoints] running" in out and "[train] up to date" in out, out
    assert "re-ranking 20 ids by local features" in out
    metrics = json.loads((work / "evaluate/metrics.json").read_text())["rerank"]
    assert metrics["method"] == "local" and {"map5", "closed_top1"} <= set(metrics["with"]) & set(metrics["without"])
    whaleid("predict", "--work", work, *TINY, *LOCAL)
    calibration = (work / "evaluate/calibration.json").read_bytes()
    assert json.loads(calibration)["method"] == "local"
    # predict reads evaluate's calibration as an input; evaluate reads no test photo
    inputs = json.loads((work / "predict/manifest.json").read_text())["inputs"]
    assert {"file/calibration.json", "file/keypoints.npz", "file/test_keypoints.npz"} <= set(inputs)
    inputs = json.loads((work / "evaluate/manifest.json").read_text())["inputs"]
    assert "file/keypoints.npz" in inputs and not any("test" in k for k in inputs), inputs

    # the report's predictions sheet draws each candidate with its best photo and the inliers joined
    pairs = match_pairs.for_work(work, tiny_set)
    preds = pd.read_csv(work / "predict/predictions.csv", dtype=str)
    image, top = preds.Image[0], next(i for i in preds.Id[0].split() if i != "new_whale")
    picture, caption = pairs.draw(image, top)
    assert "inliers with" in caption and picture.width > 1.5 * picture.height, caption
    index = report.write_report(work, tiny_set, out=tmp_path / "report", sample=4, seed=0)
    assert (tmp_path / "report/predictions.png").is_file() and "Not shown" not in index.read_text().split("redictions")[-1]

    fewer = [*LOCAL, "--set", "rerank.candidates=3"]
    out = whaleid("evaluate", "--work", work, *TINY, *fewer)
    assert "[evaluate] running (setting rerank.candidates changed" in out, out
    assert all(f"[{s}] up to date" in out for s in UPSTREAM), out
    out = whaleid("predict", "--work", work, *TINY, *fewer)
    assert "[predict] running (setting rerank.candidates changed" in out, out
    assert all(f"[{s}] up to date" in out for s in UPSTREAM + ("test_keypoints",)), out
    assert json.loads((work / "evaluate/metrics.json").read_text())["rerank"]["candidates"] == 3

    # rerank.fusion is evaluate's to fit: predict refuses the other fusion's calibration, then uses it
    by_local = [*fewer, "--set", "rerank.fusion=local"]
    code, out = cli("predict", "--work", work, *TINY, *by_local)
    assert code != 0 and "--set rerank.fusion=local first" in out, out
    whaleid("evaluate", "--work", work, *TINY, *by_local, "--tune-threshold")
    assert json.loads((work / "evaluate/calibration.json").read_text())["mode"] == "local"
    out = whaleid("predict", "--work", work, *TINY, *by_local)
    assert "using the tuned new_whale threshold" in out, out
    # auto: evaluate picks average or local by validation top-1 and predict applies its pick
    by_auto = [*fewer, "--set", "rerank.fusion=auto"]
    out = whaleid("evaluate", "--work", work, *TINY, *by_auto, "--tune-threshold")
    chosen = json.loads((work / "evaluate/calibration.json").read_text())
    assert "rerank.fusion = auto: validation top-1 (cross-fitted) average" in out, out
    assert chosen["setting"] == "auto" and chosen["mode"] in ("average", "local") and chosen["mode"] in out.split(
        "rerank.fusion = auto")[1].splitlines()[0] and set(chosen["validation_top1"]) == {"average", "local"}
    out = whaleid("predict", "--work", work, *TINY, *by_auto)
    assert "using the tuned new_whale threshold" in out and f"(fusion {chosen['mode']})" in out, out

    # back to no re-ranking: predict reruns, reading no keypoints; nothing upstream runs
    out = whaleid("predict", "--work", work, *TINY)
    assert "[predict] running (setting rerank" in out and "keypoints" not in out, out
    assert "file/keypoints.npz" not in json.loads((work / "predict/manifest.json").read_text())["inputs"]


@pytest.mark.parametrize("mask", [False, True])
def test_a_killed_keypoints_stage_resumes_with_identical_features(tiny_set, tmp_path, mask):
    """... and with keypoints.mask, identical animal masks (stored in the same artifact)."""
    args = ["--set", "rerank.method=local", "--set", f"keypoints.mask={str(mask).lower()}"]
    reference = tmp_path / "reference"
    whaleid(*preprocess_args(tiny_set, reference), *args)
    work = tmp_path / "work"
    proc = start(preprocess_args(tiny_set, work) + args, env={"WHALEID_FAULT": "keypoints.chunk@2"})
    proc.communicate(timeout=300)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "keypoints/manifest.json").exists()
    assert len(list((work / "keypoints" / PARTIAL).glob("*"))) >= 2
    out = whaleid(*preprocess_args(tiny_set, work), *args)
    assert "[keypoints] running (interrupted run" in out and "kept from the interrupted run" in out, out
    m = json.loads((work / "keypoints/manifest.json").read_text())
    part = m["partial"]["local features"]
    assert m["resumed"] and part["kept"] >= 2 and part["computed"] == part["chunks"] - part["kept"]
    assert m["counts"]["photos"] > 50 and m["counts"]["keypoints"] > 1000, m["counts"]
    assert artifacts(work, ["keypoints"]) == artifacts(reference, ["keypoints"])
    assert ("mask_bits" in np.load(work / "keypoints/keypoints.npz").files) == mask


def test_xfeat_keypoints_are_their_own_artifact_and_the_matcher_reruns_only_scoring(tiny_set, tmp_path):
    """keypoints.method = xfeat: the artifact holds XFeat's 64-d descriptors and names the weights; the
    matcher (rerank.matcher) is a scoring setting, so switching it reruns evaluate, not the features."""
    from whaleid.backbones import xfeat
    from whaleid.preprocess import keypoints
    try:
        xfeat.weights_file()
    except xfeat.XFeatMissing as e:
        pytest.skip(str(e))
    work = tmp_path / "work"
    learned = [*LOCAL, "--set", "keypoints.method=xfeat", "--set", "keypoints.side=160", "--set", "rerank.matcher=mutual"]
    whaleid("train", "--data", tiny_set, "--work", work, *TINY)
    out = whaleid("evaluate", "--work", work, *TINY, *learned)
    assert "[keypoints] running" in out and "re-ranking 20 ids by local features" in out, out
    store = keypoints.Store(work / "keypoints/keypoints.npz")
    assert store.method == "xfeat" and str(store.parts[0]["weights"]) == xfeat.XFEAT_SHA256
    name = next(iter(store.index))
    pts, desc = store.get(name)
    assert desc.dtype == np.float16 and desc.shape[1] == 64 and len(pts) > 20
    assert np.allclose(np.linalg.norm(desc.astype(np.float32), axis=1), 1, atol=0.01)
    assert (pts >= 0).all() and (pts[:, 0] <= store.size(name)[0]).all() and (pts[:, 1] <= store.size(name)[1]).all()

    out = whaleid("evaluate", "--work", work, *TINY, *learned[:-2], "--set", "rerank.matcher=ratio")
    assert "[evaluate] running (setting rerank.matcher changed" in out and "[keypoints] up to date" in out, out
    code, out = cli("evaluate", "--work", work, *TINY, *LOCAL, "--set", "rerank.matcher=lighterglue")
    assert code != 0 and "keypoints.method = 'sift' do not go together" in out and "Traceback" not in out, out

    # ALIKED + its LightGlue: a new keypoints artifact (128-d, its own weights), the same trained model
    from whaleid.backbones import aliked
    try:
        aliked.weights_file("aliked-n16.pth")
    except aliked.LightGlueMissing:
        return
    glued = [*LOCAL, "--set", "keypoints.method=aliked", "--set", "keypoints.side=160", "--set", "rerank.matcher=lightglue",
             "--set", "rerank.candidates=3", "--set", "rerank.glue_shortlist=4", "--set", "keypoints.max_points=200"]
    out = whaleid("evaluate", "--work", work, *TINY, *glued)
    assert "[keypoints] running" in out and "[train] up to date" in out and "re-ranking 3 ids" in out, out
    store = keypoints.Store(work / "keypoints/keypoints.npz")
    assert store.method == "aliked" and str(store.parts[0]["weights"]) == aliked.ALIKED_SHA256
    pts, desc = store.get(next(iter(store.index)))
    assert desc.dtype == np.float16 and desc.shape[1] == 128 and len(pts) > 5  # score > 0.2: few on tiny photos
