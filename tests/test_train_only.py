"""import-folders --train-only: extra individuals to learn from, never tested; the split stage holds its
"unseen" ids out of them first, so the tested individuals keep their gallery."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from whaleid.preprocess import split
from whaleid.cli import main
from whaleid.datasets.import_folders import FolderError, import_folders

from conftest import ROOT, whaleid


def _catalogue(root, names, photos=3, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).mkdir(parents=True)
        for j in range(photos):
            Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    return root


def test_train_only_individuals_go_to_train_only(tmp_path):
    src = _catalogue(tmp_path / "src", [f"t{i}" for i in range(6)])
    extra1 = _catalogue(tmp_path / "extra1", [f"x{i}" for i in range(4)], seed=1)
    extra2 = _catalogue(tmp_path / "extra2", ["y0", "y1"], photos=1, seed=2)
    (extra2 / "y1" / "broken.jpg").write_bytes(b"\xff\xd8junk")
    out = tmp_path / "data"
    result = CliRunner().invoke(main, ["import-folders", "--src", str(src), "--out", str(out), "--train-only",
                                       str(extra1), "--train-only", str(extra2), "--new-fraction", "0.34",
                                       "--query-fraction", "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "train_only_individuals 6" in result.output and "train_only_photos 14" in result.output
    train = pd.read_csv(out / "train.csv")
    solution = pd.read_csv(out / "solution.csv")
    sources = pd.read_csv(out / "sources.csv")
    extra_ids = {f"x{i}" for i in range(4)} | {"y0", "y1"}
    assert set(pd.read_csv(out / "train_only.csv").Id) == extra_ids
    extras = sources[sources.role == "train-only"]
    assert set(extras.individual) == extra_ids and len(extras) == 14
    assert set(extras.Image) <= set(train.Image), "every train-only photo is in train.csv"
    assert not set(extras.Image) & set(solution.Image), "no train-only photo is tested"
    assert not extra_ids & set(solution.Id), "no test row names a train-only individual"
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(train.Image)
    assert not set(extras.Image) & {p.name for p in (out / "test").iterdir()}
    assert (solution.Id == "new_whale").sum() == 3 * 2, "the new individuals come from --src only"
    assert "new_whale" not in set(train.Id)
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.source) == [f"{extra2}/y1/broken.jpg"]
    # without --train-only the tested part is unchanged (same names, same roles)
    plain = tmp_path / "plain"
    import_folders(src, plain, new_fraction=0.34, query_fraction=0.5, progress=False)
    assert (plain / "solution.csv").read_text() == (out / "solution.csv").read_text()
    assert pd.read_csv(plain / "train_only.csv").empty


def test_train_only_individual_also_tested_is_an_error(tmp_path):
    src = _catalogue(tmp_path / "src", ["a", "b", "c"])
    extra = _catalogue(tmp_path / "extra", ["b"])
    with pytest.raises(FolderError, match="'b' is in both --src and --train-only"):
        import_folders(src, tmp_path / "out", train_only=[extra], progress=False)
    with pytest.raises(FolderError, match="inside --train-only"):
        import_folders(src, extra / "out", train_only=[extra], progress=False)


def test_unseen_ids_are_drawn_from_train_only_first():
    ids = [f"k{i}" for i in range(10)] + [f"e{i}" for i in range(10)]
    photos = pd.DataFrame({"Image": [f"{i}_{j}.jpg" for i in ids for j in range(3)],
                           "Id": [i for i in ids for _ in range(3)]})
    extra = {i for i in ids if i.startswith("e")}
    for seed in range(5):
        sub = split.assign(photos, 0.2, 0.25, seed, unseen_first=extra)
        unseen = set(photos.Id[sub == "unseen"])
        assert len(unseen) == 5 and unseen <= extra
        assert (sub[photos.Id.str.startswith("k")] != "unseen").all()
    # more unseen ids than train-only ones: all of those, then the others
    sub = split.assign(photos, 0.2, 0.75, 0, unseen_first=extra)
    unseen = set(photos.Id[sub == "unseen"])
    assert len(unseen) == 15 and extra <= unseen
    # without train-only ids the draw is what it always was
    before = split.assign(photos, 0.2, 0.25, 3)
    assert before.equals(split.assign(photos, 0.2, 0.25, 3, unseen_first=set()))
    assert set(photos.Id[before == "unseen"]) & {f"k{i}" for i in range(10)}


@pytest.mark.parametrize("head", ["softmax", "arcface"])
def test_split_holds_out_train_only_ids_and_predict_never_names_them(tmp_path, head):
    src = _catalogue(tmp_path / "src", [f"t{i}" for i in range(5)], photos=4)
    extra = _catalogue(tmp_path / "extra", [f"x{i}" for i in range(5)], photos=3, seed=1)
    data = tmp_path / "data"
    import_folders(src, data, new_fraction=0.2, query_fraction=0.25, train_only=[extra], progress=False)
    work = tmp_path / "work"
    tiny = ["--quiet", "--workers", "1", "--config", ROOT / "configs" / "scratch.toml", "--set", "model.backbone=tiny",
            "--set", "run.image_size=32", "--set", "train.epochs=1", "--set", f"model.head={head}",
            "--set", "split.unseen_ids=0.3", "--set", "split.validation=0.3", "--set", "new_whale.threshold=0"]
    whaleid("preprocess", "--data", data, "--work", work, "--boxes", data / "boxes.csv", *tiny)
    s = pd.read_csv(work / "split" / "split.csv")
    unseen = set(s.Id[s.subset == "unseen"])
    assert len(unseen) == 3 and unseen <= {f"x{i}" for i in range(5)}
    tested = {f"t{i}" for i in range(5)}
    assert not set(s.Id[s.Id.isin(tested) & (s.subset == "unseen")])
    whaleid("train", "--work", work, *tiny)
    whaleid("predict", "--work", work, *tiny)
    named = {label for line in pd.read_csv(work / "submission.csv").Id for label in line.split()}
    assert named and not named & {f"x{i}" for i in range(5)}, "a train-only individual is never an answer"
    assert named - {"new_whale"} <= tested
    # evaluate ranks as predict does: a train-only individual's validation photo can only be a new whale
    out = whaleid("evaluate", "--work", work, *tiny, "--set", "evaluate.new_whale_share=0.9")
    extra_ids = {f"x{i}" for i in range(5)}
    val_extra = set(s.Image[(s.subset == "val") & s.Id.isin(extra_ids)])
    assert val_extra, "the split gives the trained train-only individuals validation photos"
    vp = pd.read_csv(work / "evaluate" / "val_predictions.csv", dtype=str, keep_default_na=False)
    assert val_extra <= set(vp.Image) and (vp[vp.Image.isin(val_extra)].truth == "new_whale").all()
    assert set(vp.truth) - {"new_whale"} <= tested and set(vp.truth) & tested
    assert not {label for a in vp.answer for label in a.split()} & extra_ids
    assert "train-only individuals are never an answer" in out
