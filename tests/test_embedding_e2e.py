"""An embedding head end to end on CPU (tiny model), on a catalogue of folders: import-folders ->
preprocess --boxes -> train (triplet) -> evaluate with verification and one-shot metrics,
--tune-threshold -> predict by gallery retrieval -> a valid submission scored against solution.csv;
a threshold tuned for another head is not used. The individuals' folders are named 1, 2, ... (ids
that pandas would read as numbers).

The catalogue is drawn here so that a tiny model learns it in seconds: each individual is a dark
body with its own colour and number of bands (the synthetic flukes of `whaleid synth` need minutes of
a real backbone; on them the tiny model stays at chance, AUC ~0.5). So the metrics can be held to
more than their ranges: AUC, one-shot accuracy and MAP@5 clearly above chance and the baseline."""
import colorsys
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.metrics import submission

from conftest import ROOT, whaleid

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=15", "--set", "train.patience=15", "--set", "train.batch_size=16",
        "--set", "train.learning_rate=0.003", "--set", "model.head=triplet", "--quiet"]
IDS, PHOTOS = 8, 10


def draw_catalogue(root, ids=IDS, photos=PHOTOS, seed=0):
    """ROOT/<n>/p<k>.jpg: individual n has its own hue (neighbours in n far apart in hue) and 2 + n
    bands across its body; position, size, brightness and the sea's noise vary from photo to photo."""
    rng = np.random.default_rng(seed)
    h, w = 100, 160
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(ids):
        folder = root / str(k + 1)
        folder.mkdir(parents=True)
        colour = np.array(colorsys.hsv_to_rgb((3 * k % ids) / ids, 0.9, 0.9)) * 255
        for j in range(photos):
            img = np.broadcast_to(np.array([40.0, 90.0, 150.0]), (h, w, 3)) + rng.normal(0, 12, (h, w, 3))
            cx, cy = w / 2 + rng.uniform(-15, 15), h / 2 + rng.uniform(-10, 10)
            rx, ry = rng.uniform(45, 60), rng.uniform(22, 30)
            body = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            band = np.floor((xx - cx + rx) / (2 * rx) * (2 + k) * 2) % 2 == 0
            img[body] = 30
            img[body & band] = colour * rng.uniform(0.8, 1.1)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"p{j}.jpg", quality=90)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The drawn catalogue, imported to the Kaggle layout (2 of the 8 individuals become new whales)."""
    root = tmp_path_factory.mktemp("catalogue")
    draw_catalogue(root / "catalogue")
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


def _check_counts(v: dict) -> None:
    """Precision / recall / F1 at both thresholds agree with their counts and with the pairs."""
    for at in (v["at_threshold"], v["at_best_threshold"]):
        tp, fp, fn = at["tp"], at["fp"], at["fn"]
        assert tp + fn == v["same_id_pairs"] and tp + fp <= v["pairs"] - v["same_id_pairs"] + tp
        assert at["precision"] == round(tp / (tp + fp) if tp + fp else 0.0, 4)
        assert at["recall"] == round(tp / (tp + fn), 4)
    lo, hi = sorted((v["at_threshold"], v["at_best_threshold"]), key=lambda a: a["threshold"])
    assert lo["tp"] + lo["fp"] >= hi["tp"] + hi["fp"], "a higher threshold says 'same' less often"


def _sweep_best(work):
    sweep = pd.read_csv(work / "evaluate" / "threshold_sweep.csv")
    return sweep.loc[sweep.map5.idxmax()]


def test_triplet_head_evaluates_tunes_and_predicts_a_valid_submission(imported, trained):
    tiny_set = imported
    out = whaleid("evaluate", "--work", trained, "--tune-threshold", "--one-shot", "3")
    assert "verification" in out and "3-way one-shot accuracy" in out and "stored threshold" in out
    m = json.loads((trained / "evaluate" / "metrics.json").read_text())
    print(m)
    assert m["head"] == "triplet" and m["model"]
    v, o = m["verification"], m["one_shot"]
    assert m["known_ids_in_eval"] > 0 and m["new_whale_share"] > 0
    assert v["pairs"] > v["same_id_pairs"] > 0
    # chance is AUC 0.5 and 1/3 in 3-way one-shot; measured 0.92-1.0 and 0.82-1.0 over run.seed 0-4
    # (ids compared as numbers instead of text would put every pair at chance)
    assert v["auc"] >= 0.8, "truths and ids compared as text, and the embedding learned"
    assert o["n_way"] == 3 and o["tasks"] >= 10 and o["accuracy"] >= 0.6
    _check_counts(v)
    # the best threshold and its MAP@5 are the sweep's best row; open-set MAP@5 far over the baseline
    best = _sweep_best(trained)
    assert m["best_threshold"] == best.threshold and m["best_map5"] == round(best.map5, 4)
    assert v["at_best_threshold"]["threshold"] == best.threshold
    assert m["best_map5"] >= m["all_new_whale_map5"] + 0.3 and m["map5"] >= m["all_new_whale_map5"] + 0.3
    tuned = json.loads((trained / "tuned_threshold.json").read_text())
    assert tuned["head"] == "triplet" and tuned["threshold"] == best.threshold
    assert "best threshold" in out

    out = whaleid("predict", "--work", trained)
    assert "using the tuned new_whale threshold" in out and "gallery:" in out
    assert json.loads((trained / "predict/manifest.json").read_text())["counts"]["threshold"] == round(tuned["threshold"], 4)
    sub = pd.read_csv(trained / "submission.csv", dtype=str)
    order = pd.read_csv(tiny_set / "sample_submission.csv", dtype=str).Image
    submission.validate(sub, list(order))
    score = submission.score_files(trained / "submission.csv", tiny_set / "solution.csv")
    print(score)
    # measured 0.61-1.0 vs the all-new_whale 0.53 over run.seed 0-4: the threshold decides the new
    # whales, so hold the known individuals' identification to more: their id first (after new_whale)
    assert score["map5"] >= score["all_new_whale_map5"] + 0.05
    truth = pd.read_csv(tiny_set / "solution.csv", dtype=str).set_index("Image").Id
    answers = sub.set_index("Image").Id.str.split()
    known_queries = truth[truth != "new_whale"].index
    first_id = [[lab for lab in answers[i] if lab != "new_whale"][0] == truth[i] for i in known_queries]
    assert np.mean(first_id) >= 0.75, f"{np.mean(first_id):.2f} of known queries get their id first (chance 1/6)"
    # the gallery holds every known id, also those split held out of training
    known = set(pd.read_csv(tiny_set / "train.csv", dtype=str).Id)
    labels = set(" ".join(sub.Id).split()) - {"new_whale"}
    trained_ids = json.loads((trained / "train" / "classes.json").read_text())
    assert labels == known and len(trained_ids) < len(known)

    # a threshold tuned for the softmax head means nothing for similarities: predict says so and ignores it
    (trained / "tuned_threshold.json").write_text(json.dumps({**tuned, "head": "softmax"}))
    out = whaleid("predict", "--work", trained)
    assert "tuned for the softmax head: ignoring it" in out
    assert json.loads((trained / "predict/manifest.json").read_text())["counts"]["threshold"] == 0.276


def test_softmax_head_gets_verification_and_one_shot_too(trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained, work)  # (copy2 keeps mtimes: preprocess stays cached)
    out = whaleid("evaluate", "--work", work, "--set", "model.head=softmax", "--set", "train.epochs=8",
                  "--set", "train.patience=8", "--one-shot", "3", "--quiet")
    assert "[train] running (setting model.head changed" in out and "[split] up to date" in out
    m = json.loads((work / "evaluate" / "metrics.json").read_text())
    print(m)
    v, o = m["verification"], m["one_shot"]
    assert m["head"] == "softmax" and v["same_id_pairs"] > 0
    # softmax 8 epochs: AUC 0.97-1.0, one-shot 0.71-0.94 over run.seed 0-2 (chance 0.5 and 1/3)
    assert v["auc"] >= 0.8 and o["n_way"] == 3 and o["tasks"] >= 10 and o["accuracy"] >= 0.55
    _check_counts(v)
    best = _sweep_best(work)
    assert m["best_threshold"] == best.threshold and m["best_map5"] == round(best.map5, 4)
    assert "3-way one-shot accuracy" in out
