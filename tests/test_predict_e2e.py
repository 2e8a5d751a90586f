"""End to end on CPU with a tiny model: preprocess -> train -> evaluate -> predict -> a valid submission."""
import json
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from whaleid.metrics import submission
from whaleid.cli import main

from conftest import ROOT, whaleid

TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=15", "--set", "train.patience=15", "--set", "train.batch_size=16",
        "--set", "train.learning_rate=0.003", "--quiet"]


@pytest.fixture(scope="module")
def trained(tiny_set, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e") / "work"
    whaleid("train", "--data", tiny_set, "--work", work, *TINY)
    return work


def test_submission_is_valid_and_beats_the_all_new_whale_baseline(tiny_set, trained):
    out = whaleid("evaluate", "--work", trained, "--tune-threshold")
    assert "MAP@5" in out and "stored threshold" in out
    tuned = json.loads((trained / "tuned_threshold.json").read_text())["threshold"]
    out = whaleid("predict", "--work", trained)
    assert "using the tuned new_whale threshold" in out
    # the value predict applied, as its manifest records it (not only what it printed)
    assert json.loads((trained / "predict/manifest.json").read_text())["counts"]["threshold"] == round(tuned, 4)
    sub = pd.read_csv(trained / "submission.csv")
    order = pd.read_csv(tiny_set / "sample_submission.csv").Image
    assert list(sub.Image) == list(order)
    submission.validate(sub, list(order))
    score = submission.score_files(trained / "submission.csv", tiny_set / "solution.csv")
    print(score)
    assert score["map5"] > score["all_new_whale_map5"] + 0.1
    out = whaleid("predict", "--work", trained, "--check", trained / "submission.csv", "--data", tiny_set)
    assert "valid" in out
    out = whaleid("predict", "--work", trained)
    assert "[predict] up to date" in out


def test_predict_check_rejects_a_broken_file(tiny_set, trained, tmp_path):
    bad = tmp_path / "bad.csv"
    sub = pd.read_csv(trained / "predict/submission.csv")
    sub.iloc[1:].to_csv(bad, index=False)
    result = CliRunner().invoke(main, ["predict", "--work", str(trained), "--check", str(bad), "--data", str(tiny_set)])
    assert result.exit_code == 1 and "missing" in result.output


def test_real_photos_give_a_valid_submission(shared_data, tmp_path):
    """The 31 real Kaggle photos (odd sizes, greyscale, a 3621 px panorama) through the whole pipeline."""
    labels = pd.read_csv(shared_data / "whales/labels.csv")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    train = labels[labels.split == "train"].copy()
    # give the real ids a second photo each so the split has something to validate: left-right flips
    rows = []
    for r in train.itertuples():
        shutil.copy(shared_data / "whales/images" / r.Image, data / "train" / r.Image)
        rows.append((r.Image, r.Id))
        if r.Id != "new_whale":
            flip = f"f{r.Image}"
            Image.open(shared_data / "whales/images" / r.Image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
                data / "train" / flip, "JPEG")
            rows.append((flip, r.Id))
    pd.DataFrame(rows, columns=["Image", "Id"]).to_csv(data / "train.csv", index=False)
    test = labels[labels.split == "test"]
    for r in test.itertuples():
        shutil.copy(shared_data / "whales/images" / r.Image, data / "test" / r.Image)
    pd.DataFrame({"Image": test.Image, "Id": "new_whale w_1 w_2 w_3 w_4"}).to_csv(data / "sample_submission.csv", index=False)
    work = tmp_path / "work"
    whaleid("predict", "--data", data, "--work", work, *TINY, "--set", "train.epochs=1")
    sub = pd.read_csv(work / "submission.csv")
    submission.validate(sub, list(test.Image))  # every test photo, in sample_submission's order
    assert list(sub.Image) == list(test.Image)
    # every real photo was decoded and answered by the model (or is a known duplicate), none fell back
    preds = pd.read_csv(work / "predict/predictions.csv")
    assert sorted(preds.Image) == sorted(test.Image) and set(preds.source) <= {"model", "known"}, preds
    known = pd.read_csv(work / "dedup/known_answers.csv")
    assert sorted(preds.Image[preds.source == "known"]) == sorted(known.Image)
    for stage in ("dedup", "boxes", "augment", "predict"):
        assert pd.read_csv(work / stage / "skipped.csv").empty, stage
    images = pd.read_csv(work / "dedup/images.csv")
    assert set(images.Image) == set(test.Image) | {image for image, _ in rows}


def test_test_photos_that_cannot_be_read_still_get_a_valid_row(tiny_set, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    sample = pd.read_csv(data / "sample_submission.csv")
    (data / "test/broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    Image.new("RGBA", (300, 200), (0, 0, 0, 0)).save(data / "test/rgba.jpg", "PNG")
    import numpy as np
    Image.fromarray((np.arange(200 * 300).reshape(200, 300) % 65535).astype(np.uint16)).save(data / "test/deep.png")
    extra = pd.DataFrame({"Image": ["absent.jpg", "broken.jpg", "rgba.jpg", "deep.png"], "Id": sample.Id.iloc[0]})
    pd.concat([sample, extra]).to_csv(data / "sample_submission.csv", index=False)
    work = tmp_path / "work"
    whaleid("predict", "--data", data, "--work", work, *TINY, "--set", "train.epochs=1")
    sub = pd.read_csv(work / "submission.csv")
    submission.validate(sub, list(sample.Image) + list(extra.Image))
    preds = pd.read_csv(work / "predict/predictions.csv").set_index("Image")
    assert preds.loc["absent.jpg", "source"] == "fallback" and preds.loc["broken.jpg", "source"] == "fallback"
    assert preds.loc["rgba.jpg", "source"] == "model" and preds.loc["deep.png", "source"] == "model"
    skipped = pd.read_csv(work / "dedup/skipped.csv").set_index("Image").reason
    assert "does not exist" in skipped["absent.jpg"] and "broken.jpg" in skipped.index


def _copy(trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained, work)  # copy2 keeps mtimes: the copy's stages stay cached
    return work


def _predict_manifest(work):
    return json.loads((work / "predict/manifest.json").read_text())


def test_tuned_threshold_is_the_sweeps_best_and_predict_applies_it(trained, tmp_path):
    work = _copy(trained, tmp_path)
    (work / "tuned_threshold.json").unlink(missing_ok=True)
    whaleid("evaluate", "--work", work, "--tune-threshold")
    m = json.loads((work / "evaluate/metrics.json").read_text())
    sweep = pd.read_csv(work / "evaluate/threshold_sweep.csv")
    val = pd.read_csv(work / "evaluate/val_predictions.csv", keep_default_na=False)
    assert sweep.threshold.tolist() == [round(0.01 * i, 2) for i in range(101)] + [1.01]
    # the all-new_whale baseline is the share of new whales; the metrics at the configured threshold
    # are those of the answers in val_predictions.csv
    answers = val.answer.str.split().tolist()
    assert m["all_new_whale_map5"] == round(float((val.truth == "new_whale").mean()), 4) == m["new_whale_share"]
    assert m["map5"] == round(submission.map5(val.truth, answers), 4) and m["threshold"] == 0.276
    # 1.01 is above every score: new_whale first everywhere, then the model's first 4 ids; so the sweep
    # always holds an answer at least as good as the all-new_whale baseline
    first4 = [[lab for lab in a if lab != "new_whale"][:4] for a in answers]
    at_101 = sweep.set_index("threshold").map5[1.01]
    assert at_101 == pytest.approx(submission.map5(val.truth, [["new_whale"] + f for f in first4]), abs=1e-9)
    assert at_101 >= m["all_new_whale_map5"]
    # the best threshold is the sweep's argmax (its first maximum), and best_map5 that maximum
    best = sweep.loc[sweep.map5.idxmax()]
    assert m["best_threshold"] == best.threshold and m["best_map5"] == round(best.map5, 4)
    assert m["best_map5"] >= max(m["map5"], round(at_101, 4))
    tuned = json.loads((work / "tuned_threshold.json").read_text())
    assert tuned["threshold"] == m["best_threshold"] and tuned["model"] == m["model"]
    out = whaleid("predict", "--work", work)
    assert "using the tuned new_whale threshold" in out
    assert _predict_manifest(work)["counts"]["threshold"] == round(m["best_threshold"], 4)
    # and the answers follow it: a photo whose best mean score is under it has new_whale first
    preds = pd.read_csv(work / "predict/predictions.csv")
    model = preds[preds.source == "model"]
    first_new = model.Id.str.split().str[0] == "new_whale"
    assert (first_new[model.top_score < m["best_threshold"]]).all()
    assert (model.top_score[~first_new] >= m["best_threshold"]).all()


def test_a_threshold_tuned_for_an_older_model_is_ignored_after_retraining(trained, tmp_path):
    work = _copy(trained, tmp_path)
    whaleid("evaluate", "--work", work, "--tune-threshold")
    tuned = json.loads((work / "tuned_threshold.json").read_text())
    assert tuned["threshold"] != 0.276, "pick another configured threshold: the tuned one is the same"
    out = whaleid("predict", "--work", work, "--set", "train.epochs=14")  # a setting of train: retrains
    assert "[train] running (setting train.epochs changed" in out
    assert "tuned for another trained model: ignoring it" in out
    assert _predict_manifest(work)["counts"]["threshold"] == 0.276  # new_whale.threshold
    # tuned again for the new model, it applies again
    whaleid("evaluate", "--work", work, "--tune-threshold")
    retuned = json.loads((work / "tuned_threshold.json").read_text())
    assert retuned["model"] != tuned["model"]
    out = whaleid("predict", "--work", work)
    assert "[predict] running" in out and "using the tuned new_whale threshold" in out
    assert _predict_manifest(work)["counts"]["threshold"] == round(retuned["threshold"], 4)


def test_with_new_whale_share_evaluate_tunes_nothing_and_predict_places_the_threshold_by_share(trained, tmp_path):
    work = _copy(trained, tmp_path)
    (work / "tuned_threshold.json").unlink(missing_ok=True)  # (an earlier test may have tuned one)
    out = whaleid("evaluate", "--work", work, "--tune-threshold", "--set", "new_whale.share=0.4")
    assert "not tuning the threshold: new_whale.share = 0.4 places it in predict" in out, out
    assert not (work / "tuned_threshold.json").exists()
    out = whaleid("predict", "--work", work, "--set", "new_whale.share=0.4")
    assert "new_whale.share = 0.4: threshold" in out, out
    preds = pd.read_csv(work / "predict/predictions.csv")
    scored = preds[preds.source.isin(["model", "known"])]  # the photos the share is taken of
    n_known = int((scored.source == "known").sum())        # (their known id goes first whatever the score)
    first_new = int((scored.Id.str.split().str[0] == "new_whale").sum())
    want = round(0.4 * len(scored))
    assert want - n_known <= first_new <= want, (first_new, want, n_known, len(scored))
