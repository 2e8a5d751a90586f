"""An embedding head end to end on CPU (tiny model), on a catalogue of folders: import-folders ->
preprocess --boxes -> train (triplet) -> evaluate with verification and one-shot metrics,
--tune-threshold -> predict by gallery retrieval -> a valid submission scored against solution.csv;
a threshold tuned for another head is not used. The individuals' folders are named 1, 2, ... (ids
that pandas would read as numbers)."""
import json
import shutil

import pandas as pd
import pytest

from whaleid import submission

from conftest import ROOT, whaleid

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
TINY = ["--config", str(ROOT / "configs/cpu.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=15", "--set", "train.patience=15", "--set", "train.batch_size=16",
        "--set", "train.learning_rate=0.003", "--set", "model.head=triplet", "--quiet"]


@pytest.fixture(scope="module")
def imported(tiny_set, tmp_path_factory):
    """tiny_set's photos of known ids as a catalogue ROOT/<n>/*.jpg, imported to the Kaggle layout."""
    root = tmp_path_factory.mktemp("catalogue")
    train = pd.read_csv(tiny_set / "train.csv").assign(folder="train")
    test = pd.read_csv(tiny_set / "solution.csv").assign(folder="test")
    photos = pd.concat([train, test])
    photos = photos[photos.Id != "new_whale"]
    for n, (ident, rows) in enumerate(photos.groupby("Id"), start=1):
        (root / "catalogue" / str(n)).mkdir(parents=True)
        for r in rows.itertuples():
            shutil.copy(tiny_set / r.folder / r.Image, root / "catalogue" / str(n) / r.Image)
    data = root / "data"
    out = whaleid("import-folders", "--src", root / "catalogue", "--out", data, "--new-fraction", "0.25",
                  "--seed", "1", "--quiet")
    assert "known 6" in out and "new 2" in out
    return data


@pytest.fixture(scope="module")
def trained(imported, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e_triplet") / "work"
    whaleid("preprocess", "--data", imported, "--work", work, "--boxes", imported / "boxes.csv", *TINY,
            "--set", "split.unseen_ids=0.2")
    whaleid("train", "--work", work, "--quiet")
    return work


def test_triplet_head_evaluates_tunes_and_predicts_a_valid_submission(imported, trained):
    tiny_set = imported
    out = whaleid("evaluate", "--work", trained, "--tune-threshold", "--one-shot", "3")
    assert "verification" in out and "3-way one-shot accuracy" in out and "stored threshold" in out
    m = json.loads((trained / "evaluate" / "metrics.json").read_text())
    assert m["head"] == "triplet" and m["model"]
    v, o = m["verification"], m["one_shot"]
    assert m["known_ids_in_eval"] > 0 and m["new_whale_share"] > 0
    assert v["pairs"] > v["same_id_pairs"] > 0 and 0 <= v["auc"] <= 1, "truths and ids compared as text"
    assert v["at_best_threshold"]["threshold"] == m["best_threshold"]
    assert o["n_way"] == 3 and o["tasks"] > 0 and 0 <= o["accuracy"] <= 1
    tuned = json.loads((trained / "tuned_threshold.json").read_text())
    assert tuned["head"] == "triplet" and tuned["threshold"] == m["best_threshold"]
    assert "best threshold" in out and m["best_map5"] >= m["map5"]

    out = whaleid("predict", "--work", trained)
    assert "using the tuned new_whale threshold" in out and "gallery:" in out
    sub = pd.read_csv(trained / "submission.csv")
    order = pd.read_csv(tiny_set / "sample_submission.csv").Image
    submission.validate(sub, list(order))
    score = submission.score_files(trained / "submission.csv", tiny_set / "solution.csv")
    print(score, m)
    assert score["map5"] > score["all_new_whale_map5"]
    # the gallery holds every known id, also those split held out of training
    known = set(pd.read_csv(tiny_set / "train.csv", dtype=str).Id)
    labels = set(" ".join(sub.Id).split()) - {"new_whale"}
    trained_ids = json.loads((trained / "train" / "classes.json").read_text())
    assert labels == known and len(trained_ids) < len(known)

    # a threshold tuned for the softmax head means nothing for similarities: predict says so and ignores it
    (trained / "tuned_threshold.json").write_text(json.dumps({**tuned, "head": "softmax"}))
    out = whaleid("predict", "--work", trained)
    assert "tuned for the softmax head: ignoring it" in out


def test_softmax_head_gets_verification_and_one_shot_too(trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained, work)  # (copy2 keeps mtimes: preprocess stays cached)
    out = whaleid("evaluate", "--work", work, "--set", "model.head=softmax", "--set", "train.epochs=2",
                  "--one-shot", "3", "--quiet")
    assert "[train] running (setting model.head changed" in out and "[split] up to date" in out
    m = json.loads((work / "evaluate" / "metrics.json").read_text())
    assert m["head"] == "softmax" and m["verification"]["same_id_pairs"] > 0
    assert m["one_shot"]["n_way"] == 3 and m["one_shot"]["tasks"] > 0 and 0 <= m["one_shot"]["accuracy"] <= 1
    assert "3-way one-shot accuracy" in out
