"""The siamese and triplet heads through the train stage (tiny backbone, 48 px, the learnable 4-id set
and stand-in upstream stages of test_train.py): artifacts, retrieval validation, early stopping's best
epoch, exact resume after a kill, the time budget, and settings that retrain."""
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


from test_train import Crash, crash_at, last_max, manifest, run_train, session

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
SETTINGS = {"siamese": ["model.head=siamese", "train.epochs=3", "train.photos_per_id=2", "train.hard_negatives=0.5"],
            "triplet": ["model.head=triplet", "train.epochs=3", "train.photos_per_id=2", "model.embedding_size=32"]}


def history(work):
    return pickle.loads((Path(work) / "train" / "HISTORY.pickle").read_bytes())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = {}
    for head, settings in SETTINGS.items():
        work = tmp_path_factory.mktemp(head)
        lines = []
        assert run_train(work, settings, lines=lines)["train"] == "ran"
        out[head] = work, lines
    return out


def _val_map5(work, head):
    """val_map5 of the saved model, recomputed as the validation callback computes it."""
    from whaleid.learning import model as models
    from whaleid.metrics import submission
    from whaleid.inference.embedding import Embedder
    from whaleid.similarity.gallery import GalleryScorer
    d = Path(work)
    train = pd.read_csv(d / "split" / "train_files.csv").drop_duplicates("Image")
    val = pd.read_csv(d / "split" / "val_files.csv")
    e = Embedder(models.load_model(d / "train" / "model.keras"))
    assert e.head.name == head
    folder = d / "augment" / "images"
    G = e.encode_files([str(folder / f) for f in train.File], 48, 8, progress=False)
    Q = e.encode_files([str(folder / f) for f in val.File], 48, 8, progress=False)
    scores = GalleryScorer(e.encode, e.similarity, G, train.Id).scores(Q)
    classes = sorted(train.Id.unique())
    ranked = [[classes[c] for c in row] for row in np.argsort(-scores, axis=1, kind="stable")[:, :5]]
    return submission.map5(val.Id, ranked), Q


@pytest.mark.parametrize("head", ["siamese", "triplet"])
def test_embedding_head_trains_validates_by_retrieval_and_keeps_the_best_epoch(trained, head):
    work, lines = trained[head]
    d = Path(work) / "train"
    assert json.loads((d / "classes.json").read_text()) == ["w_blue", "w_green", "w_red", "w_yellow"]
    hist = history(work)
    assert set(hist) == {"loss", "accuracy", "val_map5", "val_top1"} and len(hist["loss"]) == 3
    assert hist["loss"][-1] < hist["loss"][0] and hist["accuracy"][-1] > 0.8, hist
    counts = manifest(work)["counts"]
    best = last_max(hist["val_map5"])  # a tie keeps the later epoch
    assert counts["best_epoch"] == best + 1 and counts["best_val_map5"] == round(hist["val_map5"][best], 4)
    assert any(f"{head} head, batches of 4 ids x 2 photos" in x for x in lines), lines
    assert sum("checkpoint saved" in x and "val_map5" in x for x in lines) == 3
    assert not list(d.glob("*.npz"))
    recomputed, Q = _val_map5(work, head)
    assert recomputed == pytest.approx(hist["val_map5"][best], abs=1e-6), "the saved model is the best epoch's"
    if head == "triplet":
        assert Q.shape[1] == 32 and np.allclose(np.linalg.norm(Q, axis=1), 1, atol=1e-5)
    else:
        assert Q.min() >= 0 and Q.max() <= 1, "siamese embeddings are sigmoid units"


def test_siamese_killed_after_an_epoch_resumes_and_matches_the_uninterrupted_run(trained, tmp_path, monkeypatch):
    work = tmp_path / "w"
    with monkeypatch.context() as m:
        crash_at(m, "train.epoch_saved", 2)
        with pytest.raises(Crash):
            session(work, SETTINGS["siamese"]).run(session(work).stages)
    assert (work / "train" / "checkpoint.npz").exists()
    lines = []
    assert run_train(work, SETTINGS["siamese"], lines=lines)["train"] == "ran"
    m = manifest(work)
    assert m["resumed"] is True and m["counts"]["resumed_from_epoch"] == 2
    assert [x for x in lines if "checkpoint saved" in x][0].startswith("[train] epoch 3/3")
    resumed, whole = history(work), history(trained["siamese"][0])
    for k in whole:
        np.testing.assert_allclose(resumed[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_time_budget_stops_after_an_epoch_and_new_settings_retrain(trained, tmp_path):
    lines = []
    run_train(tmp_path / "w", SETTINGS["triplet"] + ["train.max_minutes=0.0001"], lines=lines)
    assert len(history(tmp_path / "w")["loss"]) == 1 and any("time budget" in x for x in lines)
    work = trained["triplet"][0]
    for change in ("train.margin=0.5", "train.photos_per_id=4", "model.embedding_size=64", "model.head=siamese"):
        st = session(work, SETTINGS["triplet"] + [change]).status(session(work).stage("train"))
        assert st.state == "stale" and change.split("=")[0] in st.reason
    from whaleid.pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="photos_per_id = 1: must be >= 2"):  # at load, before any stage
        run_train(tmp_path / "bad", ["model.head=triplet", "train.photos_per_id=1"])
    with pytest.raises(ConfigError, match="max_minutes = -1.0: must be >= 0"):
        run_train(tmp_path / "bad2", ["model.head=triplet", "train.max_minutes=-1"])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
