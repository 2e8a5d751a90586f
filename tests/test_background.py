"""Background-blind training (issue 34, train.background): the background stage writes a copy of each
training file with the scene off the animal's mask neutralised; train learns from originals and
copies; nothing that is scored (validation, gallery, test photos) ever is a copy."""
import json

import numpy as np
import pandas as pd
from PIL import Image

from whaleid.preprocess import background

from conftest import whaleid
from test_rerank_pipeline import TINY


def test_neutralised_keeps_the_animal_and_flattens_the_rest():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True  # the middle of the crop, at half resolution
    for how in ("blur", "grey"):
        out = background.neutralised(rgb, mask, how)
        assert (out[16:48, 16:48] == rgb[16:48, 16:48]).all(), how
        assert out[:12].std() < 0.5 * rgb[:12].std(), how


def test_training_reads_the_copies_and_scoring_never_does(tiny_set, tmp_path):
    work = tmp_path / "work"
    blur = [*TINY, "--set", "train.background=blur"]
    out = whaleid("train", "--data", tiny_set, "--work", work, *blur)
    assert "[background] running" in out and "[train] running" in out, out
    copies = pd.read_csv(work / "background/background_files.csv", dtype=str)
    train_files = pd.read_csv(work / "split/train_files.csv", dtype=str)
    assert sorted(copies.File) == sorted("bg-" + train_files.File) and (copies.Id.values == train_files.Id.values).all()
    first = copies.File[0]
    assert Image.open(work / "background/images" / first).size == Image.open(work / "augment/images" / first[3:]).size
    inputs = json.loads((work / "train/manifest.json").read_text())["inputs"]
    assert "file/background_files.csv" in inputs
    counts = json.loads((work / "train/manifest.json").read_text())["counts"]
    out = whaleid("evaluate", "--work", work, *blur)
    out += whaleid("predict", "--work", work, *blur)
    for stage in ("evaluate", "predict"):
        listed = json.dumps(json.loads((work / stage / "manifest.json").read_text())["inputs"])
        assert "background" not in listed, (stage, listed)
    preds = pd.read_csv(work / "evaluate/val_predictions.csv", dtype=str)
    assert not preds.astype(str).apply(lambda c: c.str.contains("bg-")).any().any()
    # off again: train reruns without the copies, and the background stage is not run
    out = whaleid("train", "--work", work, *TINY)
    assert "[train] running (setting train.background changed" in out and "[background]" not in out, out
    assert "file/background_files.csv" not in json.loads((work / "train/manifest.json").read_text())["inputs"]
    assert counts["training_files"] == 2 * json.loads((work / "train/manifest.json").read_text())["counts"]["training_files"]
