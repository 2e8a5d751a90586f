import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.datasets import synth


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed_and_any_workers(tmp_path):
    kw = dict(ids=4, photos="uniform:3", size_scale=0.2, progress=False)
    synth.generate(tmp_path / "a", seed=1, workers=1, **kw)
    synth.generate(tmp_path / "b", seed=1, workers=2, **kw)
    synth.generate(tmp_path / "c", seed=2, workers=1, **kw)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a["train.csv"] != c["train.csv"]


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        synth.generate(tmp_path / "x", ids=2, progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "user data"


def test_layout_and_ground_truth(tiny_set):
    train = pd.read_csv(tiny_set / "train.csv")
    sample = pd.read_csv(tiny_set / "sample_submission.csv")
    solution = pd.read_csv(tiny_set / "solution.csv")
    boxes = pd.read_csv(tiny_set / "boxes.csv").set_index("Image")
    assert list(train.columns) == ["Image", "Id"] and list(sample.columns) == ["Image", "Id"]
    assert train.Id.str.match(r"^(w_[0-9a-f]{7}|new_whale)$").all()
    assert sample.Id.str.split().str.len().eq(5).all()
    assert list(solution.Image) == list(sample.Image)
    assert set(train.Image).isdisjoint(sample.Image)
    for folder, names in (("train", train.Image), ("test", sample.Image)):
        for name in names:
            with Image.open(tiny_set / folder / name) as im:
                w, h = im.size
            x0, y0, x1, y1 = boxes.loc[name]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # unseen individuals are new_whale in the solution; seen ones keep their id
    known = set(train.Id) - {"new_whale"}
    assert solution.Id.isin(known | {"new_whale"}).all()
    assert 0.25 < (train.Id == "new_whale").mean() < 0.5
    assert 0.1 < (solution.Id == "new_whale").mean() < 0.5


def test_grey_fraction_and_long_tail(tmp_path):
    out = tmp_path / "lt"
    summary = synth.generate(out, ids=60, seed=0, workers=2, photos="longtail", size_scale=0.1, progress=False)
    train = pd.read_csv(out / "train.csv")
    counts = train[train.Id != "new_whale"].Id.value_counts()
    assert (counts == 1).sum() >= 5 and counts.max() >= 5, counts.describe()
    total = summary["train"] + summary["test"]
    modes = [Image.open(p).mode for p in list((out / "train").iterdir()) + list((out / "test").iterdir())]
    assert 0.07 < modes.count("L") / len(modes) < 0.25 and len(modes) == total


def test_real_distribution_option(tmp_path, shared_data):
    summary = synth.generate(tmp_path / "r", ids=30, seed=0, workers=2, photos="real", size_scale=0.1,
                             real_train_csv=shared_data / "whales/kaggle2019_train.csv", progress=False)
    train = pd.read_csv(tmp_path / "r" / "train.csv")
    assert train[train.Id != "new_whale"].Id.nunique() == 30 and summary["train"] == len(train)


def test_duplicates_are_what_they_say(tiny_set):
    dups = pd.read_csv(tiny_set / "duplicates.csv")
    solution = pd.read_csv(tiny_set / "solution.csv").set_index("Image").Id
    train = pd.read_csv(tiny_set / "train.csv").set_index("Image").Id
    assert set(dups.kind) >= {"original", "exact", "resized", "recompressed"}

    def small(name, split):
        return np.asarray(Image.open(tiny_set / split / name).convert("L").resize((32, 32)), float)

    for _, g in dups.groupby("group"):
        orig = g[g.kind == "original"].iloc[0]
        copy = g[g.kind != "original"].iloc[0]
        if copy.kind == "exact":
            assert (tiny_set / "train" / orig.Image).read_bytes() == (tiny_set / copy.split / copy.Image).read_bytes()
        assert np.abs(small(orig.Image, "train") - small(copy.Image, copy.split)).mean() < 6
        if copy.split == "test":
            assert solution[copy.Image] == train[orig.Image] or (train[orig.Image] == "new_whale"
                                                                   and solution[copy.Image] == "new_whale")
        else:
            assert train[copy.Image] == train[orig.Image]


def test_identity_is_learnable_nearest_neighbour_on_box_crops(tiny_set):
    """Photos of one individual are closer to each other than to others (64x64 box crops)."""
    train = pd.read_csv(tiny_set / "train.csv")
    train = train[train.Id != "new_whale"]
    boxes = pd.read_csv(tiny_set / "boxes.csv").set_index("Image")
    feats = []
    for name in train.Image:
        x0, y0, x1, y1 = boxes.loc[name]
        a = np.asarray(Image.open(tiny_set / "train" / name).convert("L").crop((x0, y0, x1, y1)).resize((48, 32)), float)
        feats.append(((a - a.mean()) / (a.std() + 1e-6)).ravel())
    f = np.array(feats)
    d = ((f[:, None] - f[None]) ** 2).mean(-1)
    same = train.Id.to_numpy()[:, None] == train.Id.to_numpy()[None]
    off = ~np.eye(len(f), dtype=bool)
    assert d[same & off].mean() < d[~same].mean()
