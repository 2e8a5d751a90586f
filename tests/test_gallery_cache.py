"""Gallery vectors cached between runs (scoring/gallery_cache.py): predict reuses what evaluate
embedded, a predict rerun embeds nothing, and the answers are those of a run without the cache."""
import shutil

import numpy as np

from conftest import ROOT, whaleid

TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=2", "--set", "train.batch_size=16", "--set", "model.head=arcface", "--quiet"]


def test_predict_reuses_evaluates_gallery_vectors_and_answers_the_same(tiny_set, tmp_path):
    work = tmp_path / "work"
    whaleid("train", "--data", tiny_set, "--work", work, *TINY)
    out = whaleid("evaluate", "--work", work, *TINY)
    assert "vectors from" not in out
    out = whaleid("predict", "--work", work, *TINY)
    assert "vectors from" in out, out  # the training split's photos, embedded by evaluate
    cached = (work / "submission.csv").read_bytes()
    out = whaleid("predict", "--work", work, *TINY, "--force", "predict")
    line = next(x for x in out.splitlines() if "vectors from" in x)
    n, total = line.split("gallery: ")[1].split(" vectors")[0].split(" of ")
    assert n == total, line  # nothing embedded again
    assert (work / "submission.csv").read_bytes() == cached
    # without the cache: the same answers
    shutil.rmtree(work / "gallery_cache")
    out = whaleid("predict", "--work", work, *TINY, "--force", "predict")
    assert "vectors from" not in out and (work / "submission.csv").read_bytes() == cached
    with np.load(next((work / "gallery_cache").glob("*.npz"))) as z:
        assert len(z["files"]) == len(set(z["files"])) and np.isfinite(z["vectors"]).all()
