"""Sides (issue 34): a photo's flank (left | right | unknown) from import-folders --side or a table;
with predict.sides = same a photo is compared only with photos of its own side (unknown: with all),
in the embedding's gallery, in local matching and in predict's answers; predict.sides = any ignores them."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from whaleid.data.tables import TableError, read_sides
from whaleid.datasets.import_folders import FolderError, import_folders
from whaleid.similarity.gallery import Encounters, GalleryScorer

from conftest import whaleid
from test_encounters import TINY, _sightings


def test_the_rule_sets_aside_the_other_side_only_where_both_are_known():
    rule = Encounters(sides={"q.jpg": "left", "g_left.jpg": "left", "g_right.jpg": "right"})
    gallery = ["g_left.jpg", "g_right.jpg", "g_unknown.jpg"]
    aside = rule.same(["q.jpg", "u.jpg"], rule.codes(gallery))
    assert aside.tolist() == [[False, True, False], [False, False, False]]
    assert rule.apart("q.jpg", "g_left.jpg") and not rule.apart("q.jpg", "g_right.jpg")
    assert rule.apart("q.jpg", "g_unknown.jpg") and rule.apart("u.jpg", "g_right.jpg")
    both = Encounters({"q.jpg": "s1", "g_left.jpg": "s1"}, {"q.jpg": "left", "g_left.jpg": "left", "g_right.jpg": "right"})
    assert both.same(["q.jpg"], both.codes(gallery)).tolist() == [[True, True, False]]
    assert not Encounters() and Encounters(sides={"a": "left"}) and not Encounters(sides={"a": "unknown"})


def test_the_gallery_scores_a_left_flank_by_left_flanks():
    gallery = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)  # w_a's right flank is most like the query
    scorer = GalleryScorer(lambda x: x, lambda q, g: q @ g.T, gallery, ["w_a", "w_b"])
    scorer.exclude_encounters(["a_right.jpg", "b_left.jpg"],
                              Encounters(sides={"q.jpg": "left", "a_right.jpg": "right", "b_left.jpg": "left"}))
    scorer.owners = ["q.jpg"]
    assert scorer.classes[int(np.argmax(scorer.scores(np.array([[1.0, 0.0]], np.float32))[0]))] == "w_b"


def test_import_folders_reads_the_side_from_the_file_name(tmp_path):
    src = _sightings(tmp_path / "src", ids=3, sightings=2)
    (src / "animal0" / "99_photo.jpg").write_bytes((src / "animal0" / "1_leftphoto.jpg").read_bytes())
    summary = import_folders(src, tmp_path / "data", seed=0, progress=False, encounter=r"^(\d+)_", side=r"_(left|right)photo")
    sides = pd.read_csv(tmp_path / "data" / "sides.csv", dtype=str)
    sources = pd.read_csv(tmp_path / "data" / "sources.csv", dtype=str).set_index("Image").source
    for r in sides.itertuples():
        name = sources[r.Image]
        assert r.Side == ("left" if "leftphoto" in name else "right" if "rightphoto" in name else "unknown"), name
    assert summary["side_left"] == summary["side_right"] == 6 and summary["side_unknown"] == 1
    assert len(read_sides(tmp_path / "data")) == 12  # unknown sides are not rules
    with pytest.raises(FolderError, match=r"needs a group"):
        import_folders(src, tmp_path / "d2", progress=False, side="photo")
    with pytest.raises(FolderError, match=r"1_leftphoto.jpg: --side .* reads the side '1'"):
        import_folders(src, tmp_path / "d3", progress=False, side=r"^(\d+)_")


def test_a_bad_side_in_a_table_names_the_row(tmp_path):
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Side": ["L", "top"]}).to_csv(tmp_path / "sides.csv", index=False)
    with pytest.raises(TableError, match=r"sides.csv, row 3: photo b.jpg has side 'top'"):
        read_sides(tmp_path)
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Side": ["L", ""]}).to_csv(tmp_path / "sides.csv", index=False)
    assert read_sides(tmp_path) == {"a.jpg": "left"}


def test_predict_never_names_an_id_seen_only_from_the_other_side(tiny_set, tmp_path):
    """sides.csv makes one id's known test photos left flanks, its train photos right flanks and every
    other train photo a left flank: with predict.sides = same predict never names that id for them (the
    other ids still fill the top 5); with any it names it as before."""
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    work = tmp_path / "work"
    whaleid("predict", "--data", data, "--work", work, *TINY, "--set", "boxes.detector=dark")
    solution = pd.read_csv(data / "solution.csv", dtype=str)
    train = pd.read_csv(data / "train.csv", dtype=str)
    preds = pd.read_csv(work / "predict" / "predictions.csv", dtype=str).set_index("Image")
    model = [r for r in solution.itertuples() if r.Id != "new_whale" and preds.source[r.Image] == "model"]
    target = pd.Series([r.Id for r in model if r.Id in preds.Id[r.Image].split()]).value_counts().index[0]
    model = [r for r in model if r.Id == target]
    rows = [(r.Image, "left") for r in model] + [(t.Image, "R" if t.Id == target else "l") for t in train.itertuples()]
    pd.DataFrame(rows, columns=["Image", "Side"]).to_csv(data / "sides.csv", index=False)
    out = whaleid("predict", "--data", data, "--work", work)
    assert "[predict] running (input sides.csv changed" in out and "[augment] up to date" in out, out
    after = pd.read_csv(work / "predict" / "predictions.csv", dtype=str).set_index("Image")
    assert all(len(after.Id[r.Image].split()) == 5 and target not in after.Id[r.Image].split() for r in model)
    whaleid("predict", "--data", data, "--work", work, "--set", "predict.sides=any")
    again = pd.read_csv(work / "predict" / "predictions.csv", dtype=str).set_index("Image")
    assert all(again.Id[r.Image] == preds.Id[r.Image] for r in model)


def test_identify_reads_the_batch_sides_and_the_catalogue_sides(tmp_path):
    from whaleid.inference import identify
    from whaleid.pipeline.files import StageError
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "a.jpg").write_bytes(b"x")
    inputs = {"file/photos": batch}
    assert identify.sides(inputs, ["a.jpg", "b.jpg"]) is None  # the batch does not say: every side meets every side
    pd.DataFrame({"photo": ["a.jpg"], "Side": ["Left"]}).to_csv(batch / "sides.csv", index=False)
    pd.DataFrame({"Image": ["c1.jpg", "c2.jpg"], "Side": ["right", "unknown"]}).to_csv(tmp_path / "cat.csv", index=False)
    got = identify.sides({**inputs, "file/sides.csv": tmp_path / "cat.csv"}, ["a.jpg", "b.jpg"])
    assert got == {"c1.jpg": "right", "a.jpg": "left", "b.jpg": "unknown"}
    assert [p for p, _ in identify.list_photos(batch)] == ["a.jpg"]  # the table is not a photo
    pd.DataFrame({"photo": ["a.jpg"], "Side": ["up"]}).to_csv(batch / "sides.csv", index=False)
    with pytest.raises(StageError, match=r"sides.csv, row 2: side 'up'"):
        identify.sides(inputs, ["a.jpg"])


def test_side_classes_train_each_flank_as_its_own_class_and_answer_the_true_id(tiny_set, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    train = pd.read_csv(data / "train.csv", dtype=str)
    pd.DataFrame({"Image": train.Image, "Side": ["left" if i % 2 else "right" for i in range(len(train))]}).to_csv(
        data / "sides.csv", index=False)
    work = tmp_path / "work"
    whaleid("train", "--data", data, "--work", work, *TINY, "--set", "boxes.detector=dark")
    plain = json.loads((work / "train/classes.json").read_text())
    assert not any("@" in c for c in plain)
    out = whaleid("predict", "--work", work, "--set", "train.side_classes=true")
    assert "[train] running (setting train.side_classes changed" in out, out
    assert "file/sides.csv" in json.loads((work / "train/manifest.json").read_text())["inputs"]
    classes = json.loads((work / "train/classes.json").read_text())
    assert {c.split("@")[0] for c in classes} == set(plain) and any(c.endswith("@left") for c in classes)
    preds = pd.read_csv(work / "predict/submission.csv", dtype=str)
    named = {i for ids in preds.Id for i in ids.split()}
    assert named <= set(plain) | {"new_whale"}, named - set(plain)
