"""Encounters (photos taken together: one animal, one place, minutes apart): import-folders keeps one
whole, split validates whole ones, and the ranking path never scores a query by a photo of its own
encounter, in the embedding's gallery or in local matching. Absent, every photo is its own encounter."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.data.tables import TableError, read_encounters
from whaleid.datasets.import_folders import FolderError, import_folders
from whaleid.preprocess import split
from whaleid.similarity.gallery import Encounters, GalleryScorer
from whaleid.similarity.local import Reranker

from conftest import ROOT, whaleid


def _sightings(root, ids=6, sightings=4, seed=0):
    """ids individuals, each seen `sightings` times, two photos a sighting (<sighting>_left/rightphoto)."""
    rng = np.random.default_rng(seed)
    n = 0
    for i in range(ids):
        folder = root / f"animal{i}"
        folder.mkdir(parents=True)
        for _ in range(sightings):
            n += 1
            for side in ("left", "right"):
                img = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{n}_{side}photo.jpg")
    return root


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_import_folders_keeps_each_encounter_whole(tmp_path, seed):
    src = _sightings(tmp_path / "src", seed=seed)
    out = tmp_path / "data"
    summary = import_folders(src, out, new_fraction=0.2, query_fraction=0.4, seed=seed, progress=False,
                             encounter=r"^(\d+)_")
    enc = read_encounters(out)
    sources = pd.read_csv(out / "sources.csv", dtype=str)
    assert summary["encounters"] == 24 and set(enc) == set(sources.Image)
    sides = sources.assign(encounter=sources.Image.map(enc)).groupby("encounter").role.agg(set)
    assert all(len(r) == 1 for r in sides), "an encounter is never split between gallery and queries"
    known = sources[sources.role != "new"].groupby("individual").role.agg(set)
    assert all("gallery" in r for r in known) and any("query" in r for r in known)


def test_import_folders_refuses_a_name_the_pattern_cannot_read(tmp_path):
    src = _sightings(tmp_path / "src", ids=3, sightings=2)
    Image.new("RGB", (30, 20)).save(src / "animal1" / "portrait.jpg")
    with pytest.raises(FolderError) as e:
        import_folders(src, tmp_path / "data", seed=0, progress=False, encounter=r"^(\d+)_")
    assert "portrait.jpg" in str(e.value) and r"^(\d+)_" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FolderError, match="needs a group"):
        import_folders(src, tmp_path / "data2", seed=0, progress=False, encounter=r"^\d+_")
    assert not (tmp_path / "data").exists() and not (tmp_path / "data2").exists()


def test_an_encounters_table_without_its_columns_or_a_blank_is_a_clear_error(tmp_path):
    (tmp_path / "encounters.csv").write_text("Image,Sighting\na.jpg,1\n")
    with pytest.raises(TableError, match="encounters.csv: expected columns Image, Encounter"):
        read_encounters(tmp_path)
    (tmp_path / "encounters.csv").write_text("Image,Encounter\na.jpg,1\nb.jpg,\n")
    with pytest.raises(TableError, match=r"row 3: photo b.jpg has no encounter"):
        read_encounters(tmp_path)
    assert read_encounters(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("seed", range(6))
def test_split_validates_whole_encounters(seed):
    rng = np.random.default_rng(seed)
    rows = [(f"{i}_{e}_{s}.jpg", f"w{i}", f"{i}-{e}") for i in range(12) for e in range(int(rng.integers(1, 5)))
            for s in range(int(rng.integers(1, 4)))]
    photos = pd.DataFrame(rows, columns=["Image", "Id", "Encounter"])
    subset = split.assign(photos[["Image", "Id"]], 0.3, 0.2, seed, encounter=photos.Encounter)
    sides = pd.DataFrame({"e": photos.Encounter, "s": subset}).groupby("e").s.agg(set)
    assert all(len(s) == 1 for s in sides), "an encounter is all validation or all training"
    for ident, group in photos.assign(s=subset).groupby("Id"):
        if "val" in set(group.s):
            assert "train" in set(group.s) and group.Encounter.nunique() >= 2
    without = split.assign(photos[["Image", "Id"]], 0.3, 0.2, seed)
    assert (without == split.assign(photos[["Image", "Id"]], 0.3, 0.2, seed, encounter=None)).all()


def test_the_gallery_leaves_out_the_query_own_encounter():
    """The query's own sighting's photo is the most similar (same background); left out, the id whose
    photo is of another encounter ranks first."""
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    scorer = GalleryScorer(lambda x: x, lambda q, g: q @ g.T, gallery, ["w_a", "w_b", "w_a"])
    query = np.array([[1.0, 0.0]], np.float32)
    assert scorer.classes[int(np.argmax(scorer.scores(query)))] == "w_a"
    scorer.exclude_encounters(["g1.jpg", "g2.jpg", "g3.jpg"],
                              Encounters({"q.jpg": "s1", "g1.jpg": "s1", "g2.jpg": "s2", "g3.jpg": "s3"}))
    scorer.owners = ["q.jpg"]
    best = scorer.scores(query)[0]
    assert scorer.classes[int(np.argmax(best))] == "w_b" and best[0] == pytest.approx(0.0)
    scorer.owners = ["other.jpg"]  # a query of another encounter keeps every photo
    assert scorer.classes[int(np.argmax(scorer.scores(query)))] == "w_a"


def test_local_matching_never_pairs_a_query_with_its_own_encounter():
    r = Reranker.__new__(Reranker)
    r.encounters = Encounters({"q.jpg": "14", "g1.jpg": "14", "g2.jpg": "15"})
    assert not r.apart("q.jpg", "g1.jpg") and r.apart("q.jpg", "g2.jpg") and not r.apart("q.jpg", "q.jpg")
    r.encounters = Encounters()
    assert r.apart("q.jpg", "g1.jpg"), "without encounters only the photo itself is left out"


TINY = ["--config", str(ROOT / "configs/scratch.toml"), "--set", "model.backbone=tiny", "--set", "run.image_size=48",
        "--set", "train.epochs=2", "--set", "train.batch_size=16", "--set", "model.head=arcface", "--quiet"]


def test_predict_never_scores_a_test_photo_by_its_own_encounter(tiny_set, tmp_path):
    """A data folder whose encounters.csv puts each known test photo in one encounter with every train
    photo of its true id: predict must then never name that id (all its photos are set aside); the
    same work folder without the table names it for most photos. The table reruns split (validation
    by whole encounters) and what follows, nothing before it."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    work = tmp_path / "work"
    whaleid("predict", "--data", data, "--work", work, *TINY, "--set", "boxes.detector=dark")
    solution = pd.read_csv(data / "solution.csv", dtype=str)
    train = pd.read_csv(data / "train.csv", dtype=str)
    preds = pd.read_csv(work / "predict" / "predictions.csv", dtype=str).set_index("Image")
    model = [r for r in solution.itertuples() if r.Id != "new_whale" and preds.source[r.Image] == "model"]
    assert model
    named = np.mean([r.Id in preds.Id[r.Image].split() for r in model])
    ids = {r.Id for r in model}  # one encounter per id: its known test photos and all its train photos
    rows = [(r.Image, f"enc-{r.Id}") for r in model] + [(t.Image, f"enc-{t.Id}") for t in train.itertuples() if t.Id in ids]
    pd.DataFrame(rows, columns=["Image", "Encounter"]).to_csv(data / "encounters.csv", index=False)
    out = whaleid("predict", "--data", data, "--work", work)
    assert "[predict] running (input encounters.csv changed" in out and "[split] running (input encounters.csv" in out
    assert "[augment] up to date" in out, "nothing before the split reads encounters"
    after = pd.read_csv(work / "predict" / "predictions.csv", dtype=str).set_index("Image")
    enc = read_encounters(data)
    for r in model:
        same = {t.Id for t in train.itertuples() if enc.get(t.Image) == enc.get(r.Image)}
        assert r.Id in same and r.Id not in after.Id[r.Image].split(), (r.Image, after.Id[r.Image])
    assert named > 0.5, f"without encounters the true id is named for {named:.0%} of the known test photos"


def test_id_batches_pair_photos_across_encounters():
    """P x K batches (triplet, siamese): with encounters, an id's chunk of K photos takes K different
    encounters where it has them, so a photo's positives do not share its background."""
    from whaleid.learning import batches
    photos = [f"{i}_{e}_{s}.jpg" for i in range(4) for e in range(3) for s in range(2)]
    labels = [int(p.split("_")[0]) for p in photos]
    encounters = ["_".join(p.split("_")[:2]) for p in photos]
    for epoch in range(3):
        index, _ = batches.epoch_plan(labels, photos, 8, 2, seed=0, epoch=epoch, encounters=encounters)
        pairs = index.reshape(-1, 2)
        assert all(encounters[a] != encounters[b] for a, b in pairs), "both photos of a chunk from one encounter"
        assert set(index) == set(range(len(photos)))
        plain, _ = batches.epoch_plan(labels, photos, 8, 2, seed=0, epoch=epoch)
        assert any(encounters[a] == encounters[b] for a, b in plain.reshape(-1, 2)), "without: pairs may share one"


def test_evaluate_hands_the_split_encounters_to_the_ranking_path(tiny_set, tmp_path, monkeypatch):
    """evaluate ranks through inference/ranking.py (whose same-encounter rule the tests above check) with
    split.csv's encounters, and its validation takes whole encounters."""
    import shutil
    from whaleid.inference import ranking
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    train = pd.read_csv(data / "train.csv", dtype=str)
    nth = train.groupby("Id").cumcount()  # an id's photos two by two: one trip each
    pd.DataFrame({"Image": train.Image, "Encounter": [f"{i}-{n // 2}" for i, n in zip(train.Id, nth)]}).to_csv(
        data / "encounters.csv", index=False)
    seen = []

    class Recording(ranking.Ranker):
        def __init__(self, *args, encounters=None, **kwargs):
            seen.append(encounters)
            super().__init__(*args, encounters=encounters, **kwargs)

    monkeypatch.setattr(ranking, "Ranker", Recording)
    work = tmp_path / "work"
    whaleid("evaluate", "--data", data, "--work", work, *TINY, "--set", "boxes.detector=dark")
    split_csv = pd.read_csv(work / "split" / "split.csv", dtype=str)
    assert len(seen) == 1 and seen[0].of == dict(zip(split_csv.Image, split_csv.Encounter)) and not seen[0].sides
    sides = split_csv.groupby("Encounter").subset.agg(set)
    assert all(len(s) == 1 for s in sides) and "val" in set(split_csv.subset)
