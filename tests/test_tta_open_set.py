"""Test-time versions (embedding.tta_versions / prepare, augment.TTA) and evaluate's open-set sample
(evaluate.open_set), on constructed arrays and tables: no trained model."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.preprocess import augment
from whaleid.inference import evaluate
from whaleid.inference import embedding
from whaleid.data.tables import NEW_WHALE

SIZE = 48


def _base(seed=0):
    """A photo crop with structure in both directions (a mirror or a crop changes it everywhere)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 5, y * 5, (x * y) % 256], -1) + np.random.default_rng(seed).integers(0, 20, (SIZE, SIZE, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _prepare(path, name, seed=42, tta=True):
    job = (name, str(path), None)  # box None: the file is already a crop (what evaluate passes)
    image, versions, error = embedding.prepare(job, size=SIZE, margin=0.05, crop_max=20, sigma_max=1.0,
                                             seed=seed, tta=tta)
    assert image == name and error is None
    return versions


def test_four_versions_original_exact_mirror_crop_and_flipped_blurred_crop(tmp_path):
    base = _base()
    path = tmp_path / "a.png"
    Image.fromarray(base).save(path)
    v = _prepare(path, "a.png")
    assert v.shape == (4, SIZE, SIZE, 3) and v.dtype == np.uint8
    assert [name for name, _, _ in augment.TTA] == ["original", "flip", "crop", "crop-flip-blur"]
    assert (v[0] == base).all(), "version 0 is the photo itself"
    assert (v[1] == base[:, ::-1]).all(), "version 1 is its exact left-right mirror (no blur, no crop)"
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()
    assert diff(v[2], base) > 5, "version 2 is a crop, resized back: not the photo"
    # version 3 is version 2 mirrored (and blurred at most a little): far closer to that than to v2
    assert diff(v[3], v[2][:, ::-1]) < 0.3 * diff(v[3], v[2])
    # without TTA: the photo alone
    one = _prepare(path, "a.png", tta=False)
    assert one.shape == (1, SIZE, SIZE, 3) and (one[0] == base).all()


def test_versions_are_deterministic_per_photo_whatever_came_before(tmp_path):
    base = _base()
    for name in ("a.png", "b.png"):
        Image.fromarray(base).save(tmp_path / name)  # the same pixels under two names
    first = _prepare(tmp_path / "a.png", "a.png")
    other = _prepare(tmp_path / "b.png", "b.png")
    again = _prepare(tmp_path / "a.png", "a.png")
    assert (first == again).all(), "the same photo gives the same versions, in any order of photos"
    # the random crop comes from the photo's name (and the seed): another photo, another crop
    assert (first[:2] == other[:2]).all() and (first[2] != other[2]).any()
    assert (_prepare(tmp_path / "a.png", "a.png", seed=7)[2] != first[2]).any()
    # as the augment stage's own generator would draw it: (seed + 1, name)
    rng = augment.photo_rng(42 + 1, "a.png")
    assert (embedding.tta_versions(base, rng, 20, 1.0) == first).all()


def test_prepare_crops_to_the_box_when_given_one(tmp_path):
    big = np.zeros((200, 300, 3), np.uint8)
    big[50:150, 100:250] = 200
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    image, versions, error = embedding.prepare(("big.jpg", str(path), (100, 50, 250, 150)), size=SIZE, margin=0.0,
                                             crop_max=20, sigma_max=1.0, seed=42, tta=True)
    assert error is None and versions[0].mean() > 190  # the box's bright region fills the crop
    image, versions, error = embedding.prepare(("gone.jpg", str(tmp_path / "gone.jpg"), None), size=SIZE,
                                             margin=0.0, crop_max=20, sigma_max=1.0, seed=42, tta=True)
    assert versions is None and "not found" in error


def _split(n_val=30, n_unseen=40, n_new=60, n_train=50):
    rows = [(f"t{i}.jpg", f"w_{i % 10}", "train") for i in range(n_train)]
    rows += [(f"v{i}.jpg", f"w_{i % 10}", "val") for i in range(n_val)]
    rows += [(f"u{i}.jpg", f"w_u{i % 4}", "unseen") for i in range(n_unseen)]
    rows += [(f"n{i}.jpg", NEW_WHALE, "new_whale") for i in range(n_new)]
    return pd.DataFrame(rows, columns=["Image", "Id", "subset"])


@pytest.mark.parametrize("share", [0.27, 0.5, 0.1])
def test_open_set_has_the_configured_new_whale_share(share):
    split = _split()
    ev = evaluate.open_set(split, share, seed=42)
    val = split[split.subset == "val"]
    new = ev[ev.truth == NEW_WHALE]
    assert len(new) == round(share * len(val) / (1 - share))
    assert abs(len(new) / len(ev) - share) < 0.02
    # every validation photo, with its own id as the answer
    assert sorted(ev.Image[ev.truth != NEW_WHALE]) == sorted(val.Image)
    assert (ev[ev.truth != NEW_WHALE].set_index("Image").truth == val.set_index("Image").Id).all()
    # the new whales are drawn from the unseen ids' and the new_whale photos, each once
    assert set(new.Image) <= set(split.Image[split.subset.isin(["unseen", "new_whale"])]) and new.Image.is_unique


def test_unseen_ids_are_new_whales_and_the_draw_is_seeded():
    split = _split(n_val=30, n_unseen=200, n_new=0)  # only unseen ids can play the new whales
    ev = evaluate.open_set(split, 0.27, seed=42)
    unseen = ev[ev.Image.str.startswith("u")]
    assert len(unseen) == 11 and (unseen.truth == NEW_WHALE).all() and unseen.Id.str.startswith("w_u").all()
    assert ev.equals(evaluate.open_set(split, 0.27, seed=42))
    assert not ev.equals(evaluate.open_set(split, 0.27, seed=1))
    # an unseen photo answered new_whale first scores 1; answered with its (never trained) id, 0
    from whaleid.metrics import submission
    assert submission.map5([unseen.truth.iloc[0]], [[NEW_WHALE, "w_1"]]) == 1.0
    assert submission.map5([unseen.truth.iloc[0]], [[unseen.Id.iloc[0], "w_1"]]) == 0.0


def test_too_few_new_whales_are_all_used():
    split = _split(n_val=30, n_unseen=2, n_new=3)
    ev = evaluate.open_set(split, 0.27, seed=42)
    assert (ev.truth == NEW_WHALE).sum() == 5 and len(ev) == 35


def test_train_only_ids_validation_photos_are_new_whales():
    """Train-only ids are never an answer in predict; evaluate's open set treats their photos the same way."""
    split = _split(n_val=30, n_unseen=0, n_new=100)
    ev = evaluate.open_set(split, 0.5, seed=42, never={"w_1", "w_2"})
    banned = split[(split.subset == "val") & split.Id.isin({"w_1", "w_2"})]
    known = ev[ev.truth != NEW_WHALE]
    assert len(known) == 30 - len(banned) and not known.Id.isin({"w_1", "w_2"}).any()
    assert len(ev) - len(known) == len(known)  # the share holds over the answerable photos
    drawn = ev[ev.Image.isin(banned.Image)]
    assert (drawn.truth == NEW_WHALE).all()
    everything = evaluate.open_set(split, 0.99, seed=42, never={"w_1", "w_2"})
    assert set(banned.Image) <= set(everything.Image[everything.truth == NEW_WHALE])
