"""The ArcFace head and GeM pooling on constructed numbers (hand-worked values)."""
import math

import numpy as np
import pytest


def test_arcface_logits_add_the_margin_to_the_true_class_angle_only():
    from whaleid.learning.heads.arcface import arcface_logits
    # two classes; the photo's cosine to class 0 (its own) is cos 60 deg, to class 1 cos 80 deg
    cos = np.array([[math.cos(math.radians(60)), math.cos(math.radians(80))]], "float32")
    out = np.asarray(arcface_logits(cos, np.array([0]), np.array([0.5, 0.5], "float32"), 10.0))
    assert out[0, 0] == pytest.approx(10 * math.cos(math.radians(60) + 0.5), abs=1e-4)
    assert out[0, 1] == pytest.approx(10 * math.cos(math.radians(80)), abs=1e-4)
    # per-class margins: class 1 is the true one now, with its own margin 0.2
    out = np.asarray(arcface_logits(cos, np.array([1]), np.array([0.5, 0.2], "float32"), 10.0))
    assert out[0, 1] == pytest.approx(10 * math.cos(math.radians(80) + 0.2), abs=1e-4)
    assert out[0, 0] == pytest.approx(10 * math.cos(math.radians(60)), abs=1e-4)
    # past pi - m the logit keeps falling with the angle (cos - m sin m), never rises again
    cos = np.array([[math.cos(math.radians(170))]], "float32")
    out = float(np.asarray(arcface_logits(cos, np.array([0]), np.array([0.5], "float32"), 1.0))[0, 0])
    assert out == pytest.approx(math.cos(math.radians(170)) - 0.5 * math.sin(0.5), abs=1e-5)


def test_arcface_loss_is_cross_entropy_of_the_margin_logits():
    from whaleid.learning.heads.arcface import ArcFaceLoss
    cos = np.array([[0.9, 0.1, -0.2], [0.3, 0.8, 0.0]], "float32")
    y = np.array([0, 1], "float32")
    loss = float(ArcFaceLoss(np.array([0.5, 0.5, 0.5]), 30.0)(y, cos))
    expected = []
    for row, label in zip(cos, (0, 1)):
        z = 30 * row.astype(np.float64)
        z[label] = 30 * math.cos(math.acos(row[label]) + 0.5)
        expected.append(-z[label] + math.log(np.exp(z).sum()))
    assert loss == pytest.approx(np.mean(expected), rel=1e-4)


def test_subcentres_give_each_id_its_nearest_centre():
    from whaleid.learning.heads.arcface import CosineCentres
    layer = CosineCentres(2, subcenters=2)
    layer.build((None, 2))
    # id 0: centres at 0 and 90 degrees; id 1: at 180 and 270 (columns: id-major, then sub-centre)
    layer.centres.assign(np.array([[1, 0, -1, 0], [0, 1, 0, -1]], "float32") * 3.0)  # any length: normalised
    x = np.array([[0.0, 1.0], [math.cos(math.radians(200)), math.sin(math.radians(200))]], "float32")
    out = np.asarray(layer(x))
    np.testing.assert_allclose(out[0], [1.0, 0.0], atol=1e-6)        # at 90: id 0's second centre
    np.testing.assert_allclose(out[1], [math.cos(math.radians(110)), math.cos(math.radians(20))], atol=1e-6)


def test_dynamic_margins_grow_as_the_photo_count_falls():
    from whaleid.learning.heads.arcface import id_margins
    m = id_margins([1, 16, 81], 0.5, dynamic=True)
    assert m[0] == pytest.approx(0.5) and m[2] == pytest.approx(0.25)
    # 16^-1/4 = 0.5 lies between 1 (rarest) and 81^-1/4 = 1/3 (most common): (0.5 - 1/3) / (2/3) = 0.25
    assert m[1] == pytest.approx(0.25 + 0.25 * 0.25)
    np.testing.assert_allclose(id_margins([1, 16, 81], 0.5, dynamic=False), 0.5)


def test_gem_pooling_against_a_hand_computed_value():
    from whaleid.learning.model import GeM
    x = np.array([1.0, 2.0, 3.0, 4.0], "float32").reshape(1, 2, 2, 1)
    layer = GeM(p=3.0)
    out = float(np.asarray(layer(x))[0, 0])
    assert out == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3), rel=1e-5)
    layer.p.assign(1.0)
    assert float(np.asarray(layer(x))[0, 0]) == pytest.approx(2.5, rel=1e-5)
    assert len(layer.trainable_weights) == 1, "p is learned"


# ---------------------------------------------------------------- flipped photos as new ids

def test_mirrored_variants_and_their_ids():
    import pandas as pd
    from whaleid.preprocess import augment
    assert augment.mirrored(augment.OFFLINE) == (False, True, False, True)
    assert augment.mirrored(augment.TTA) == (False, True, False, True)   # crop-flip-blur: the crop, flipped
    files = pd.DataFrame({"File": ["a_0.jpg", "a_1.jpg", "a_2.jpg", "a_3.jpg"], "Image": ["a.jpg"] * 4,
                          "Id": ["w_1"] * 4})
    out = augment.flip_ids(files, dict(zip(files.File, augment.VARIANTS)))
    assert list(out.Id) == ["w_1", "w_1_flip", "w_1", "w_1_flip"]
    assert list(files.Id) == ["w_1"] * 4, "the input table is not changed"


def test_a_mirrored_version_scores_an_id_by_its_flip_class():
    from whaleid.inference.embedding import MirrorFold

    class Fixed:
        def __init__(self, rows):
            self.rows = np.array(rows, "float32")

        def predict_on_batch(self, images):
            return self.rows

    classes = ["w_a", "w_a_flip", "w_b", "w_b_flip"]
    # one photo, two versions: the original, then a mirrored one
    rows = [[0.9, 0.1, 0.3, 0.2],      # original: w_a 0.9, w_b 0.3
            [0.2, 0.8, 0.6, 0.4]]      # mirrored: looks like w_a_flip (0.8) -> counts for w_a
    fold = MirrorFold(Fixed(rows), classes, (False, True), same=False)
    assert fold.classes == ["w_a", "w_b"]
    np.testing.assert_allclose(fold.predict_on_batch(None), [[0.9, 0.3], [0.8, 0.4]])
    same = MirrorFold(Fixed(rows), classes, (False, True), same=True)
    np.testing.assert_allclose(same.predict_on_batch(None), [[0.9, 0.3], [0.8, 0.6]])
    # two photos of two versions each: the pattern repeats per photo
    np.testing.assert_allclose(MirrorFold(Fixed(rows * 2), classes, (False, True), False).predict_on_batch(None),
                               [[0.9, 0.3], [0.8, 0.4]] * 2)


def test_share_threshold_puts_new_whale_first_for_that_share():
    from whaleid.similarity import answers
    best = [0.9, 0.2, 0.5, 0.7, 0.4, 0.95, 0.3, 0.8, 0.6, 0.1]
    thr = answers.share_threshold(best, 0.3)
    assert sum(b < thr for b in best) == 3 and thr == pytest.approx(0.35)
    assert answers.share_threshold(best, 0.0) == 0.0 and answers.share_threshold(best, 0.999) == 1.01
    labels = answers.insert_new_whale(["w_a", "w_b"], [0.2, 0.1], thr, 3)
    assert labels[0] == "new_whale"


# ---------------------------------------------------------------- through the train stage

ARCFACE = ["model.head=arcface", "model.embedding_size=16", "model.subcenters=2", "model.arcface_scale=10",
           "model.pooling=gem", "train.epochs=3", "train.learning_rate=0.005", "train.flip_ids=true"]


def test_arcface_with_flip_ids_trains_and_a_killed_run_ends_like_an_uninterrupted_one(tmp_path):
    import json
    from test_train import history, killed_at, manifest, run_train
    whole = tmp_path / "whole"
    run_train(whole, ARCFACE)
    classes = json.loads((whole / "train" / "classes.json").read_text())
    assert classes == sorted(["w_blue", "w_green", "w_red", "w_yellow"] + [
        f"{c}_flip" for c in ("w_blue", "w_green", "w_red", "w_yellow")]), classes
    h = history(whole)
    assert "val_map5" in h and h["loss"][-1] < h["loss"][0]
    killed = tmp_path / "killed"
    killed_at(killed, "train.epoch_saved@2", ARCFACE)
    run_train(killed, ARCFACE)
    assert manifest(killed)["counts"]["resumed_from_epoch"] == 2
    a = history(killed)
    for k in h:
        np.testing.assert_allclose(a[k], h[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_arcface_flip_ids_and_share_threshold_end_to_end(tiny_set, tmp_path):
    """preprocess -> train -> evaluate -> predict with ArcFace, flipped photos as new ids and the
    new_whale threshold placed by share; the submission never names a <id>_flip class."""
    import json
    import pandas as pd
    from conftest import ROOT, whaleid
    from whaleid.metrics import submission
    work = tmp_path / "w"
    sets = ["model.backbone=tiny", "run.image_size=48", "train.epochs=8", "train.batch_size=16",
            "train.learning_rate=0.003", "model.head=arcface", "model.embedding_size=16", "model.arcface_scale=10",
            "train.flip_ids=true", "new_whale.share=0.3", "model.arcface_centre_weight=0.5"]
    args = ["--config", str(ROOT / "configs/scratch.toml"), "--quiet"] + [a for s in sets for a in ("--set", s)]
    whaleid("train", "--data", tiny_set, "--work", work, *args)
    assert any(c.endswith("_flip") for c in json.loads((work / "train/classes.json").read_text()))
    out = whaleid("evaluate", "--work", work)
    assert "by share" in out, out
    m = json.loads((work / "evaluate/metrics.json").read_text())
    assert m["share"] == 0.3 and 0 <= m["share_threshold"] <= 1.01
    out = whaleid("predict", "--work", work)
    assert "new_whale.share = 0.3" in out, out
    sub = pd.read_csv(work / "submission.csv")
    labels = [label for row in sub.Id for label in row.split()]
    assert not any(label.endswith("_flip") for label in labels)
    first = sub.Id.str.split().str[0]
    known = set(pd.read_csv(work / "dedup/known_answers.csv").Image)
    share = (first[~sub.Image.isin(known)] == "new_whale").mean()
    assert abs(share - 0.3) < 0.1, share
    score = submission.score_files(work / "submission.csv", tiny_set / "solution.csv")
    assert score["map5"] > score["all_new_whale_map5"], score
