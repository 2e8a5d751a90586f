"""whaleid import-folders: ROOT/<id>/*.jpg|png -> the Kaggle layout + solution.csv, never touching ROOT."""
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from whaleid.cli import main
from whaleid.datasets.import_folders import FolderError, import_folders

COUNTS = {"Ayo": 4, "Blackie": 3, "Big Ben": 5, "Dada": 1, "Enderoni": 2, "Fuzz": 6, "Gogo": 3, "Hiro": 2,
          "Ivo": 4, "Juno": 3}


def _catalogue(root):
    """Ten individuals, nested one level for some (as lion/{train,val}/<name>/), JPEG and PNG, plus a
    broken photo and a text file."""
    rng = np.random.default_rng(0)
    for k, (name, n) in enumerate(COUNTS.items()):
        folder = root / ("train" if k % 2 else "val") / name if k < 6 else root / name
        folder.mkdir(parents=True)
        for j in range(n):
            size = (40 + 7 * j, 30 + 3 * k)
            img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
            img.save(folder / f"{name}_{j}.{'png' if j % 2 else 'JPG'}")
    (root / "val" / "Ayo" / "broken.jpg").write_bytes(b"\xff\xd8junk")
    (root / "train" / "Fuzz" / "notes.txt").write_text("not a photo")
    return root


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_layout_solution_and_roles(tmp_path):
    src = _catalogue(tmp_path / "catalogue")
    before = _snapshot(src)
    out = tmp_path / "data"
    result = CliRunner().invoke(main, ["import-folders", "--src", str(src), "--out", str(out),
                                       "--new-fraction", "0.3", "--seed", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "1 files were not readable" in result.output and f"--boxes {out / 'boxes.csv'}" in result.output
    assert _snapshot(src) == before, "the source folder is only read"
    train = pd.read_csv(out / "train.csv")
    sample = pd.read_csv(out / "sample_submission.csv")
    solution = pd.read_csv(out / "solution.csv")
    sources = pd.read_csv(out / "sources.csv")
    assert sorted(os.listdir(out / "train")) == sorted(train.Image)
    assert sorted(os.listdir(out / "test")) == sorted(sample.Image) and list(sample.Image) == list(solution.Image)
    assert len(sources) == sum(COUNTS.values()) and set(sources.individual) == {n.replace(" ", "_") for n in COUNTS}
    assert not any(n.split("_")[0] in i for n in COUNTS for i in sources.Image), "names do not reveal the id"
    by_role = sources.groupby("individual").role.agg(set)
    new = {i for i, r in by_role.items() if r == {"new"}}
    assert len(new) == 3, "30% of 10 individuals held out entirely"
    assert all(r <= {"gallery", "query"} and "gallery" in r for i, r in by_role.items() if i not in new)
    truth = dict(zip(solution.Image, solution.Id))
    for r in sources.itertuples():
        if r.role == "gallery":
            assert dict(zip(train.Image, train.Id))[r.Image] == r.individual
        else:
            assert truth[r.Image] == ("new_whale" if r.role == "new" else r.individual)
    assert "new_whale" not in set(train.Id) and (solution.Id == "new_whale").sum() == sum(
        COUNTS[n] for n in COUNTS if n.replace(" ", "_") in new)
    queries = sources[sources.role == "query"].groupby("individual").size()
    assert (queries > 0).any() and "Dada" not in queries.index, "a one-photo individual stays in the gallery"
    assert all(len(l.split()) == 5 for l in sample.Id)
    boxes = pd.read_csv(out / "boxes.csv").set_index("Image")
    for name in list(train.Image[:3]) + list(sample.Image[:3]):
        folder = "train" if name in set(train.Image) else "test"
        with Image.open(out / folder / name) as im:
            assert tuple(boxes.loc[name]) == (0, 0, *im.size)
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.source) == ["val/Ayo/broken.jpg"] and "not an image" in skipped.reason[0]
    # the same seed gives the same data set
    again = tmp_path / "again"
    import_folders(src, again, new_fraction=0.3, seed=5, progress=False)
    assert (again / "solution.csv").read_text() == (out / "solution.csv").read_text()


@pytest.mark.parametrize("case, message", [
    ("root_photo", "photo directly in"),
    ("same_name", "two folders give the id 'Ayo'"),
    ("inside", "inside --src"),
    ("not_empty", "not empty"),
    ("too_few", "at least 2"),
])
def test_bad_sources_are_one_clear_error(tmp_path, case, message):
    src = tmp_path / "src"
    for name in ("Ayo", "Bo", "Cy"):
        (src / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), (10, 20, 30)).save(src / name / "a.jpg")
    out, fraction = tmp_path / "out", 0.3
    if case == "root_photo":
        Image.new("RGB", (20, 20)).save(src / "stray.jpg")
    elif case == "same_name":
        (src / "more" / "Ayo").mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(src / "more" / "Ayo" / "b.jpg")
    elif case == "inside":
        out = src / "converted"
    elif case == "not_empty":
        out.mkdir()
        (out / "x").write_text("keep me")
    elif case == "too_few":
        fraction = 0.9
    with pytest.raises(FolderError, match=message):
        import_folders(src, out, new_fraction=fraction, progress=False)
    if case == "not_empty":
        assert (out / "x").read_text() == "keep me"
    result = CliRunner().invoke(main, ["import-folders", "--src", str(src), "--out", str(out),
                                       "--new-fraction", str(fraction)])
    assert result.exit_code == 1 and message.split("'")[0] in result.output and "Traceback" not in result.output


def test_real_nyala_catalogue(shared_data, tmp_path):
    out = tmp_path / "nyala"
    summary = import_folders(shared_data / "nyala", out, new_fraction=0.3, seed=0, progress=False)
    assert summary["individuals"] == 29 and summary["skipped"] == 0
    assert summary["train_photos"] + summary["test_queries"] + summary["test_new_whale"] == 329
    assert summary["new"] == 9 and summary["known"] == 20
