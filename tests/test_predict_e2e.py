"""End to end on CPU with a tiny model: preprocess -> train -> evaluate -> predict -> a valid submission."""
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from whaleid import submission
from whaleid.cli import main

from conftest import ROOT, whaleid

TINY = ["--config", str(ROOT / "configs/cpu.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
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
    out = whaleid("predict", "--work", trained)
    assert "using the tuned new_whale threshold" in out
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
    submission.validate(sub, list(test.Image))
    assert (work / "predict/manifest.json").exists()


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
