"""The animal's mask (issue 34, keypoints.mask): GrabCut seeded by the animal class-activation map,
stored per photo in the keypoints artifact, and no keypoint off the mask is ever stored or matched."""
import json

import cv2
import numpy as np
import pytest

from whaleid.preprocess import keypoints, masks

from conftest import whaleid
from test_rerank import pattern
from test_rerank_pipeline import LOCAL, TINY


def test_packed_masks_read_back_and_points_are_tested_on_the_right_grid():
    rng = np.random.default_rng(0)
    made = [rng.random((h, w)) > 0.5 for h, w in ((7, 13), (160, 120), (1, 1))]
    arrays = masks.pack(made)
    assert all((masks.unpack(arrays, i) == m).all() for i, m in enumerate(made))
    m = np.zeros((10, 20), bool)
    m[:, :10] = True  # the left half of the crop
    pts = np.array([[5.0, 50.0], [95.0, 50.0], [100.5, 0.0], [0.0, 99.9]])
    assert masks.inside(m, pts, 200, 100).tolist() == [True, True, False, True]


def test_keypoints_are_taken_on_the_mask_only():
    grey = pattern(3)
    mask = np.zeros((90, 120), bool)  # a quarter-resolution mask: the crop's middle third
    mask[:, 40:80] = True
    for method in ("sift", "orb"):
        pts, desc = keypoints.features(grey, method, 300, mask)
        full = keypoints.features(grey, method, 300)[0]
        inside = masks.inside(mask, pts.astype(np.float32), grey.shape[1], grey.shape[0])
        assert len(pts) >= 30 and inside.all(), method
        assert not masks.inside(mask, full.astype(np.float32), grey.shape[1], grey.shape[0]).all()


def test_aliked_keypoints_are_taken_on_the_mask_only():
    from whaleid.backbones import aliked
    try:
        aliked.weights_file("aliked-n16.pth")
    except aliked.LightGlueMissing as e:
        pytest.skip(str(e))
    rgb = np.repeat(pattern(3)[..., None], 3, axis=2)  # ALIKED reads colour
    mask = np.zeros((90, 120), bool)
    mask[:, 40:80] = True
    pts, desc = keypoints.features(rgb, "aliked", 300, mask)
    full = keypoints.features(rgb, "aliked", 300)[0]
    assert len(pts) >= 30 and masks.inside(mask, pts.astype(np.float32), rgb.shape[1], rgb.shape[0]).all()
    assert desc.shape == (len(pts), 128) and desc.dtype == np.float16
    assert not masks.inside(mask, full.astype(np.float32), rgb.shape[1], rgb.shape[0]).all()


def test_the_mask_follows_the_animal_map_on_real_photos(shared_data):
    """On real nyala photos the mask is part of the photo, the same every time, and where the animal
    class-activation map is high (it refines the map, it does not wander off): a check that it follows
    its seed, not that it is right (no reference masks exist here)."""
    from whaleid.preprocess import subject_box
    files = sorted((shared_data / "nyala").rglob("*.jpg"))[::40][:6]
    for f in files:
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        m, how = masks.animal_mask(rgb)
        assert max(m.shape) == masks.SIDE and how in ("grabcut", "map", "whole")
        assert 0.05 < m.mean() < 0.95, (f, m.mean())
        assert (masks.animal_mask(rgb)[0] == m).all()
        cam = cv2.resize(subject_box.subject_map(rgb)[0].astype(np.float32), m.shape[::-1])
        assert cam[m].mean() > cam[~m].mean() + 0.1, (f, cam[m].mean(), cam[~m].mean())


def test_masked_keypoints_stage_stores_masks_and_no_point_off_them(tiny_set, tmp_path):
    work = tmp_path / "work"
    whaleid("train", "--data", tiny_set, "--work", work, *TINY)
    out = whaleid("evaluate", "--work", work, *TINY, *LOCAL, "--set", "keypoints.mask=true")
    assert "[keypoints] running" in out, out
    store = keypoints.Store(work / "keypoints/keypoints.npz")
    for name in list(store.index)[:40]:
        pts, _ = store.get(name)
        m = store.mask(name)
        w, h = store.size(name)
        assert m is not None and m.any() and masks.inside(m, pts, w, h).all(), name
    counts = json.loads((work / "keypoints/manifest.json").read_text())["counts"]
    assert 0 < counts["median_mask_share"] < 1
    from whaleid.report import page as report  # the box sheets show the masks
    index = report.write_report(work, tiny_set, out=tmp_path / "report", sample=4, seed=0)
    assert (tmp_path / "report/boxes_masks.png").is_file() and "Animal masks" in index.read_text()
    out = whaleid("evaluate", "--work", work, *TINY, *LOCAL)
    assert "[keypoints] running (setting keypoints.mask changed (True -> False))" in out, out
    assert keypoints.Store(work / "keypoints/keypoints.npz").mask(name) is None
