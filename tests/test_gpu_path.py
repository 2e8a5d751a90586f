"""The GPU path's pieces that run on one CPU (issue 18): full training batches and per-worker input
shards, the settings validate_every / checkpoint_every, XLA reported as it really is, the TPU
refusals, and scripts/gpu_check.py importing cleanly."""
import subprocess
import sys

import numpy as np
import pytest

from test_train import ROOT, history, manifest, run_train

from whaleid.pipeline import config
from whaleid.learning import inputs
from whaleid.pipeline.stage import StageError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _jpegs(folder, n, size=16):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.jpg"
        Image.fromarray(np.full((size, size, 3), i * 10 % 256, np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_every_training_batch_is_full_uint8_and_every_file_is_used_each_epoch(tmp_path):
    paths = _jpegs(tmp_path, 10)
    ds = inputs.train_dataset(paths, list(range(10)), 16, 4, seed=1, first_epoch=0, epochs=2)
    got = [(x.numpy(), y.numpy()) for x, y in ds]
    assert len(got) == 2 * inputs.steps(10, 4) == 6
    assert all(x.shape == (4, 16, 16, 3) and x.dtype == np.uint8 for x, _ in got), "full batches, uint8"
    for epoch in (got[:3], got[3:]):
        labels = np.concatenate([y for _, y in epoch])
        assert set(labels) == set(range(10)) and len(labels) == 12  # 2 slots completed with the epoch's first files


@pytest.mark.parametrize("per_id", [False, True])
def test_each_worker_reads_only_its_replicas_rows(tmp_path, per_id):
    """2 workers x 2 replicas: worker w's per-replica batches are rows [4w, 4w+4) of each global batch
    of 8, in replica order; together the workers read each global batch exactly once."""
    n = 12
    paths = _jpegs(tmp_path, n)
    labels = list(range(n)) if not per_id else [i // 3 for i in range(n)]
    photos = [f"p{i}" for i in range(n)]

    def batches(shard):
        if per_id:
            ds = inputs.id_batch_dataset(paths, labels, photos, 16, 8, 2, 1, 0, 1, shard)
            return [x.numpy()[:, 0, 0, 0] for x, _ in ds]
        ds = inputs.train_dataset(paths, labels, 16, 8, 1, 0, 1, shard)
        return [y.numpy() for _, y in ds]

    whole = batches(None)
    parts = [batches(inputs.Shard(first=2 * w, local=2, replicas=4)) for w in range(2)]
    assert all(len(b) == 2 for p in parts for b in p), "per-replica batches of 8 / 4"
    for step, full in enumerate(whole):
        for w in range(2):
            mine = np.concatenate(parts[w][2 * step:2 * step + 2])
            np.testing.assert_array_equal(mine, full[4 * w:4 * w + 4])


def test_validate_every_checkpoint_every_and_xla_as_it_really_is(tmp_path):
    lines = []
    settings = ["train.epochs=3", "train.validate_every=2", "train.checkpoint_every=2", "train.xla=true",
                "train.online_augment=true", "train.patience=5"]
    run_train(tmp_path / "w", settings, lines=lines)
    hist = history(tmp_path / "w")
    assert hist["val_accuracy"][0] is None and None not in hist["val_accuracy"][1:], "epochs 2 and 3 (the last)"
    epochs = [x for x in lines if "] epoch " in x or x.startswith("epoch ")]
    assert [("checkpoint saved" in x) for x in epochs] == [False, True, True], epochs
    assert any("xla off" in x for x in lines) and not any("xla on" in x for x in lines)
    why = [x for x in lines if "train.xla = true, but" in x]
    assert why and "train.online_augment" in why[0], lines
    counts = manifest(tmp_path / "w")["counts"]
    assert counts["xla"] is False and counts["best_epoch"] in (2, 3)


def test_tpu_refuses_what_it_cannot_run_before_connecting(tmp_path):
    from whaleid.learning import devices
    cfg = config.load(ROOT / "configs" / "scratch.toml", ["train.online_augment=true"])
    get = lambda key: config.get(cfg, key)  # noqa: E731
    with pytest.raises(StageError, match="train.online_augment = true.*ImageProjectiveTransformV3"):
        devices.check_supported(get, True, "auto")
    devices.check_supported(get, False, "auto")  # GPUs and CPUs run it
    cfg["train"]["online_augment"] = False
    devices.check_supported(get, True, "auto")
    with pytest.raises(StageError, match="mixed_float16"):
        devices.check_supported(get, True, "mixed_float16")
    # the stage refuses at its start, before looking for a TPU (none here: that would be another error)
    with pytest.raises(StageError, match="train.online_augment = true"):
        run_train(tmp_path / "w", ["train.strategy=tpu", "train.online_augment=true"])


@pytest.mark.parametrize("setting", ["train.validate_every=0", "train.checkpoint_every=0", "train.checkpoint_minutes=-1"])
def test_the_new_settings_are_checked_at_load(setting):
    with pytest.raises(config.ConfigError, match=setting.split("=")[0]):
        config.load(None, [setting])


def test_replicas_and_batches_errors_name_the_settings():
    assert inputs.global_batch(100, 8, False) == 96 and inputs.global_batch(25, 4, True) == 100
    with pytest.raises(ValueError, match="train.batch_size = 3.*train.batch_per_replica"):
        inputs.global_batch(3, 4, False)


def test_gpu_check_imports_and_documents_its_checks():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--epochs" in out.stdout
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check
    for name in ("replicas_part", "throughput_check", "validation_check", "xla_check"):
        assert callable(getattr(gpu_check, name))
    doc = " ".join(gpu_check.__doc__.split())
    for words in ("4 logical GPUs", "overflow", "batch 100, 50 steps", "uint8 input", "checkpoint.npz save",
                  "2,000-photo gallery", "XLA", "exits 2"):
        assert words in doc, words
