import numpy as np
import pandas as pd
from PIL import Image

from whaleid.preprocess import augment, split


def test_crop_to_box_resizes_the_box_region():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[20:60, 50:150] = 255
    out = augment.crop_to_box(rgb, (50, 20, 150, 60), margin=0.0, size=32)
    assert out.shape == (32, 32, 3) and out.mean() > 250
    wider = augment.crop_to_box(rgb, (50, 20, 150, 60), margin=0.2, size=32)
    assert wider.mean() < out.mean()


def test_variants_are_deterministic_for_a_name_and_differ_between_names():
    base = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a = augment.variants(base, augment.photo_rng(1, "x.jpg"), 20, 1.0)
    b = augment.variants(base, augment.photo_rng(1, "x.jpg"), 20, 1.0)
    c = augment.variants(base, augment.photo_rng(1, "y.jpg"), 20, 1.0)
    assert len(a) == 4 and all((u == v).all() for u, v in zip(a, b))
    assert any((u != v).any() for u, v in zip(a[2:], c[2:]))
    assert (a[0] == base).all() and all(v.shape == base.shape for v in a)
    # variant 1 is the flip (blurred): close to the mirror image, far from the original
    assert np.abs(a[1].astype(int) - base[:, ::-1]).mean() < np.abs(a[1].astype(int) - base).mean()


def test_decode_for_crop_uses_a_reduced_decode_and_keeps_the_box(tmp_path):
    rgb = np.zeros((1600, 3200, 3), np.uint8)
    rgb[400:1200, 800:2400] = (200, 30, 30)
    p = tmp_path / "big.jpg"
    Image.fromarray(rgb).save(p, "JPEG", quality=95)
    pixels, box = augment.decode_for_crop(p, (800, 400, 2400, 1200), 96)
    assert pixels.shape[1] < 3200 and box[2] - box[0] >= 96
    crop = augment.crop_to_box(pixels, box, 0.0, 96)
    assert crop[..., 0].mean() > 180 and crop[..., 1].mean() < 60


def _photos(counts, new=5):
    rows = [(f"{i}_{k}.jpg", i) for i, n in counts.items() for k in range(n)]
    rows += [(f"nw{k}.jpg", "new_whale") for k in range(new)]
    return pd.DataFrame(rows, columns=["Image", "Id"])


def test_split_by_photo_keeps_singletons_in_training_and_holds_out_unseen_ids():
    counts = {f"w_{i:03d}": (1 if i % 3 == 0 else 2 + i % 7) for i in range(90)}
    photos = _photos(counts)
    sub = split.assign(photos, validation=0.3, unseen_ids=0.1, seed=0)
    assert (sub == split.assign(photos, 0.3, 0.1, 0)).all()
    assert (sub != split.assign(photos, 0.3, 0.1, 1)).any()
    by_id = photos.assign(subset=sub).groupby("Id").subset.agg(set)
    for ident, subsets in by_id.items():
        if ident == "new_whale":
            assert subsets == {"new_whale"}
        elif counts[ident] == 1:
            assert subsets == {"train"}, "a single-photo id stays in training"
        elif "unseen" in subsets:
            assert subsets == {"unseen"}, "an unseen id has no training photo"
        else:
            assert "train" in subsets and "val" in subsets
    multi = sum(1 for n in counts.values() if n >= 2)
    assert by_id.apply(lambda s: "unseen" in s).sum() == round(0.1 * multi)
    val_frac = (sub == "val").sum() / sub.isin(["train", "val"]).sum()
    assert 0.2 < val_frac < 0.4
