"""The train stage on a tiny learnable synthetic set (48 px, 4 ids), behind stand-in augment and split
stages that write the real artifact names. Also runnable as a subprocess:
    python tests/test_train.py WORK [--logical-cpus N] [--keras-home DIR] [key=value ...]
builds the synthetic upstream in WORK if missing, runs train (printing the stage's lines) and prints
`finished` or `StageError: <message>`."""
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from whaleid.pipeline import config  # noqa: E402
from whaleid.pipeline.stage import Session, Stage, StageError  # noqa: E402

SIZE = 48
IDS = ("w_red", "w_green", "w_blue", "w_yellow")
PHOTOS, VAL_PHOTOS = 6, 2          # per id; the last VAL_PHOTOS go to validation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
BASE = ["model.backbone=tiny", "model.pooling=avg2x2", f"run.image_size={SIZE}", "train.epochs=4",
        "train.batch_size=8", "train.patience=4", "train.learning_rate=0.01",
        "model.bn_momentum=0.0", "train.online_augment=false"]  # pinned: cpu.toml's values may change


# ---------------------------------------------------------------- the synthetic upstream

def _photo(cls: int, k: int) -> np.ndarray:
    """Each id: its own colour and shape (bar, column, disc, diagonal), jittered, plus noise."""
    rng = np.random.default_rng([cls, k])
    colours = [(200, 40, 40), (40, 180, 60), (40, 70, 210), (220, 200, 40)]
    img = np.full((SIZE, SIZE, 3), 90, np.float32) + rng.normal(0, 20, (SIZE, SIZE, 3))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    c = SIZE // 2 + rng.integers(-6, 7, 2)
    mask = [np.abs(yy - c[0]) < 6, np.abs(xx - c[1]) < 6,
            (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 12 ** 2, np.abs(yy - xx - (c[0] - c[1])) < 6][cls]
    img[mask] = np.array(colours[cls]) + rng.normal(0, 15, (mask.sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _augment(run):
    out = run.path("images")
    out.mkdir(exist_ok=True)
    rows = []
    for cls, ident in enumerate(IDS):
        for k in range(PHOTOS):
            base = _photo(cls, k)
            for v, img in enumerate((base, base[:, ::-1])):
                name = f"{ident}_{k}_{v}.jpg"
                Image.fromarray(np.ascontiguousarray(img)).save(out / name, quality=95)
                rows.append((name, f"{ident}_{k}.jpg", ident, ("original", "flip-blur")[v]))
    run.write_csv("TRAINING_FILE_FINAL.csv", pd.DataFrame(rows, columns=["File", "Image", "Id", "variant"]))
    return {"files": len(rows)}


def _split(run):
    files = run.read_csv("augment", "TRAINING_FILE_FINAL.csv")
    k = files.Image.str.extract(r"_(\d+)\.jpg$")[0].astype(int)
    val = k >= PHOTOS - VAL_PHOTOS
    run.write_csv("train_files.csv", files[~val][["File", "Image", "Id"]])
    if run.setting("split.validation") > 0:
        run.write_csv("val_files.csv", files[val & (files.variant == "original")][["File", "Image", "Id"]])
    else:
        run.write_csv("val_files.csv", pd.DataFrame(columns=["File", "Image", "Id"]))
    return {}


AUGMENT = Stage("augment", _augment, artifacts=("images/", "TRAINING_FILE_FINAL.csv"))
SPLIT = Stage("split", _split, artifacts=("train_files.csv", "val_files.csv"), settings=("split.validation",),
              upstream=("augment",))


def session(work, overrides=(), echo=lambda m: None):
    from whaleid.stages import TRAIN
    cfg = config.load(ROOT / "configs" / "scratch.toml", tuple(BASE) + tuple(overrides))
    return Session(cfg=cfg, work=Path(work), data=None, stages=[AUGMENT, SPLIT, TRAIN], progress=False,
                   echo=echo)


def run_train(work, overrides=(), force=(), lines=None):
    s = session(work, overrides, echo=(lines.append if lines is not None else lambda m: None))
    return s.run(s.stages, set(force))


def subprocess_train(work, *args, **popen):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env.update(popen.pop("env", {}))
    return subprocess.Popen([sys.executable, __file__, str(work), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **popen)


def manifest(work):
    return json.loads((Path(work) / "train" / "manifest.json").read_text())


def history(work):
    return pickle.loads((Path(work) / "train" / "HISTORY.pickle").read_bytes())


def images(ident, k, v=0):
    return np.stack([_photo(IDS.index(ident), k)[:, ::-1] if v else _photo(IDS.index(ident), k)])


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted training (MobileNetV3Small from keras.applications, weights none)."""
    work = tmp_path_factory.mktemp("trained")
    lines = []
    t = time.time()
    out = run_train(work, ["model.backbone=MobileNetV3Small"], lines=lines)
    return work, out, lines, time.time() - t


def test_training_writes_artifacts_that_load_and_predict(trained):
    import keras
    from whaleid.learning import model as models
    work, out, lines, seconds = trained
    assert out["train"] == "ran"
    d = work / "train"
    classes = json.loads((d / "classes.json").read_text())
    assert classes == sorted(IDS)
    net = keras.saving.load_model(d / "model.keras")
    assert models.find_backbone(net).name.lower().startswith("mobilenetv3small")
    assert net.get_layer("preprocess").backbone == "MobileNetV3Small"
    raw = np.concatenate([images(i, 0) for i in classes]).astype("float32")  # raw 0-255 RGB
    probs = np.asarray(net.predict(raw, verbose=0))
    assert probs.shape == (4, 4) and probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)
    hist = history(work)
    assert len(hist["accuracy"]) == 4 and set(hist) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    csv = pd.read_csv(d / "history.csv")
    assert list(csv.epoch) == [0, 1, 2, 3] and np.allclose(csv.accuracy, hist["accuracy"])
    assert pickle.loads((d / "MODEL_TIME.pickle").read_bytes()) > 0
    counts = manifest(work)["counts"]
    assert counts["epochs"] == 4 and counts["classes"] == 4 and counts["images_per_second"] > 0
    assert counts["best_val_accuracy"] == round(max(hist["val_accuracy"]), 4)
    assert counts["best_epoch"] == last_max(hist["val_accuracy"]) + 1
    # the saved model holds the best epoch's weights: it scores that epoch's validation loss
    assert abs(_evaluate(work)[0] - hist["val_loss"][counts["best_epoch"] - 1]) < 1e-4
    assert not list(d.glob("*.npz")), "checkpoints are removed once the artifacts are written"
    if importlib.util.find_spec("tensorboard"):
        assert list((d / "logs").rglob("*tfevents*")), "TensorBoard logs"
    else:
        assert any("no TensorBoard logs" in m for m in lines)
    assert sum("checkpoint saved" in m and "val_accuracy" in m for m in lines) == 4, "one line per epoch"
    print(f"\n[MobileNetV3Small 48px] {seconds:.1f}s; history {hist}")


def test_training_learns_the_learnable_set(trained):
    work, *_ = trained
    hist = history(work)
    assert hist["accuracy"][-1] > 0.5, f"training accuracy {hist['accuracy']} should rise above chance (0.25)"
    assert hist["accuracy"][-1] > hist["accuracy"][0]


class Crash(Exception):
    pass


def crash_at(monkeypatch, point, nth=1):
    """Make the run raise Crash (in-process) the nth time it reaches fault point `point` (see
    whaleid.pipeline.files.fault_point; "train.epoch_saved": right after an epoch's checkpoint is written)."""
    from whaleid.learning import callbacks, checkpoint
    hits = []

    def fault_point(name):
        if name == point:
            hits.append(name)
            if len(hits) == nth:
                raise Crash(f"{name} #{nth}")
    monkeypatch.setattr(callbacks, "fault_point", fault_point)
    monkeypatch.setattr(checkpoint, "fault_point", fault_point)


def killed_at(work, point, overrides=()):
    """Train in a subprocess that SIGKILLs itself at fault point `point` ("name@k"); its output."""
    proc = subprocess_train(work, *overrides, env={"WHALEID_FAULT": point})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}:\n{out[-3000:]}"
    return out


def test_second_run_is_cached_changed_setting_retrains_force_starts_over(tmp_path, monkeypatch):
    work = tmp_path / "w"
    base = ["train.epochs=2"]
    assert run_train(work, base)["train"] == "ran"
    first = manifest(work)
    assert run_train(work, base)["train"] == "cached"
    changed = base + ["model.dropout=0.3"]
    st = session(work, changed).status(session(work).stage("train"))
    assert st.state == "stale" and "model.dropout" in st.reason
    assert run_train(work, changed) == {"augment": "cached", "split": "cached", "train": "ran"}
    assert manifest(work)["settings"]["model.dropout"] == 0.3
    # a run that dies after epoch 1 leaves a checkpoint a plain rerun would resume from ...
    with monkeypatch.context() as m:
        crash_at(m, "train.epoch_saved", 1)
        with pytest.raises(Crash):
            session(work, base).run(session(work).stages, {"train"})
    assert (work / "train" / "checkpoint.npz").exists() and (work / "train" / ".running.json").exists()
    # ... but --force starts over
    lines = []
    assert run_train(work, base, force={"train"}, lines=lines)["train"] == "ran"
    m = manifest(work)
    assert m["resumed"] is False and "resumed_from_epoch" not in m["counts"]
    assert not any("resuming" in x for x in lines) and sum("checkpoint saved" in x for x in lines) == 2
    # and gives the first run's result again (seeded, deterministic on CPU)
    assert m["artifacts"]["HISTORY.pickle"] == first["artifacts"]["HISTORY.pickle"]


def test_killed_after_the_last_epoch_rerun_only_writes_the_artifacts(tmp_path, monkeypatch):
    work = tmp_path / "w"
    with monkeypatch.context() as m:
        crash_at(m, "train.epoch_saved", 2)
        with pytest.raises(Crash):
            session(work, ["train.epochs=2"]).run(session(work).stages)
    assert not (work / "train" / "model.keras").exists()
    lines = []
    assert run_train(work, ["train.epochs=2"], lines=lines)["train"] == "ran"
    assert not any("checkpoint saved" in x for x in lines), "no epoch is trained again"
    m = manifest(work)
    assert m["resumed"] is True and m["counts"]["resumed_from_epoch"] == 2 and m["counts"]["epochs"] == 2
    hist = history(work)
    assert m["counts"]["best_epoch"] == last_max(hist["val_accuracy"]) + 1
    # the model holds the best epoch's weights, restored from the checkpoint
    assert abs(_evaluate(work)[1] - max(hist["val_accuracy"])) < 1e-6


def _evaluate(work):
    """(loss, accuracy) of the saved model on the validation files, decoded as training decodes them."""
    import keras
    from whaleid.learning import inputs, model as models
    d = Path(work)
    val = pd.read_csv(d / "split" / "val_files.csv")
    classes = json.loads((d / "train" / "classes.json").read_text())
    y = [classes.index(i) for i in val.Id]
    ds = inputs.eval_dataset([str(d / "augment" / "images" / f) for f in val.File], y, SIZE, 8)
    probs = np.asarray(models.load_model(d / "train" / "model.keras").predict(ds, verbose=0))
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(np.array(y), probs)))
    return loss, float(np.mean(probs.argmax(1) == np.array(y)))


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    work = tmp_path / "w"
    lines = []
    run_train(work, ["train.epochs=8", "train.patience=1"], lines=lines)
    hist = history(work)
    first, best = int(np.argmax(hist["val_accuracy"])), last_max(hist["val_accuracy"])
    assert len(hist["val_accuracy"]) < 8 and any("early stopping" in x for x in lines), hist
    assert len(hist["val_accuracy"]) == first + 2, "stops one epoch (patience 1) after the first best"
    assert manifest(work)["counts"]["best_epoch"] == best + 1, "a tie keeps the later epoch"
    # learnt: training accuracy near 1, validation (unseen photos of the same ids) above chance (0.25)
    assert hist["accuracy"][best] > 0.9 and hist["val_accuracy"][best] > 0.5, hist
    # the saved model is the best epoch's, not the last epoch's
    loss, acc = _evaluate(work)
    assert abs(acc - hist["val_accuracy"][best]) < 1e-6
    assert abs(loss - hist["val_loss"][best]) < 1e-4, (loss, hist)
    if best < len(hist["val_loss"]) - 1:
        assert abs(loss - hist["val_loss"][-1]) > 1e-3, (loss, hist)


def last_max(values) -> int:
    """The epoch (0-based) early stopping keeps: the last of the maximal values (a tie keeps the later)."""
    v = np.asarray(values, float)
    return int(len(v) - 1 - np.argmax(v[::-1]))


EPOCHS_5 = ["train.epochs=5", "train.online_augment=true"]  # random layers: their state must resume too


@pytest.fixture(scope="module")
def uninterrupted_5(tmp_path_factory):
    work = tmp_path_factory.mktemp("whole5")
    run_train(work, EPOCHS_5)
    return history(work)


@pytest.mark.parametrize("point, resumed_from", [
    ("train.epoch_saved@2", 2),   # right after epoch 2's checkpoint
    ("train.batch@6", 1),         # mid-epoch 2 (4 steps per epoch): epoch 1's checkpoint is the last
    ("train.best_saved@1", None),  # between the first best-<epoch>.npz and the checkpoint that names it
])
def test_a_kill_anywhere_in_training_resumes_and_matches_an_uninterrupted_run(tmp_path, uninterrupted_5, point,
                                                                              resumed_from):
    work = tmp_path / "killed"
    killed_at(work, point, EPOCHS_5)
    assert (work / "train" / ".running.json").exists() and not (work / "train" / "model.keras").exists()
    lines = []
    assert run_train(work, EPOCHS_5, lines=lines)["train"] == "ran"
    m = manifest(work)
    assert m["resumed"] is True
    if resumed_from is not None:
        assert m["counts"]["resumed_from_epoch"] == resumed_from
    csv = pd.read_csv(work / "train" / "history.csv")
    assert list(csv.epoch) == [0, 1, 2, 3, 4], "every epoch once"
    assert not list((work / "train").glob("*.npz")) and not list((work / "train").glob(".*.tmp"))
    resumed = history(work)
    assert resumed.keys() == uninterrupted_5.keys()
    for k in uninterrupted_5:
        np.testing.assert_allclose(resumed[k], uninterrupted_5[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_corrupt_checkpoint_restarts_cleanly_with_a_message(tmp_path):
    work = tmp_path / "w"
    killed_at(work, "train.epoch_saved@1", ["train.epochs=2"])
    (work / "train" / "checkpoint.npz").write_bytes(b"not a zip file")
    lines = []
    assert run_train(work, ["train.epochs=2"], lines=lines)["train"] == "ran"
    assert any("no usable checkpoint" in x and "starting at epoch 1" in x for x in lines), lines
    m = manifest(work)
    assert "resumed_from_epoch" not in m["counts"] and m["counts"]["epochs"] == 2


def test_offline_imagenet_fails_fast_with_one_clear_line(tmp_path):
    # no cached weights (empty KERAS_HOME) and a proxy that refuses connections: offline even on a
    # machine that is online
    dead = "http://127.0.0.1:9"
    t = time.time()
    proc = subprocess_train(tmp_path / "w", "model.backbone=MobileNetV3Small", "model.weights=imagenet",
                            "--keras-home", str(tmp_path / "keras"),
                            env={"https_proxy": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "HTTP_PROXY": dead})
    out = proc.communicate(timeout=120)[0]
    lines = out.splitlines()
    errors = [i for i, x in enumerate(lines) if x.startswith("StageError: ")]
    assert len(errors) == 1, out[-3000:]
    msg = lines[errors[0]]
    assert "imagenet" in msg and "weights file" in msg and "none" in msg
    assert str(tmp_path / "keras" / "models") in msg, "says where an offline notebook can attach the file"
    assert lines[errors[0] + 1].startswith("seconds in stage: "), "the message is one line"
    assert "Traceback" not in out
    # the stage itself gives up within seconds (the process also pays ~5 s to import TensorFlow)
    assert float(out.split("seconds in stage: ")[1].split()[0]) < 10
    assert time.time() - t < 60


def test_missing_weights_file_and_impossible_head_batches_are_clear_errors(tmp_path):
    with pytest.raises(StageError, match="no such file"):
        run_train(tmp_path / "a", ["model.weights=" + str(tmp_path / "nope.weights.h5")])
    with pytest.raises(StageError, match="batch_size = 4 holds fewer than 2 ids"):
        run_train(tmp_path / "b", ["model.head=siamese", "train.batch_size=4", "train.photos_per_id=4"])


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # the mismatched file below
def test_local_weights_file_loads_into_the_backbone(tmp_path):
    import keras
    from whaleid.learning import model as models
    cfg = lambda *o: config.load(ROOT / "configs" / "scratch.toml", tuple(BASE) + ("model.backbone=MobileNetV3Small",) + o)
    x = np.concatenate([images("w_red", 0), images("w_blue", 1)]).astype("float32")
    keras.utils.set_random_seed(1)
    source = models.build_model(cfg(), 4)
    path = tmp_path / "backbone.weights.h5"
    models.find_backbone(source).save_weights(path)

    def features(net):
        return np.asarray(models.find_backbone(net)(net.get_layer("preprocess")(x), training=False))

    keras.utils.set_random_seed(2)
    loaded = models.build_model(cfg(f"model.weights={path}"), 4)
    keras.utils.set_random_seed(2)
    fresh = models.build_model(cfg(), 4)
    assert all(np.array_equal(a, b) for a, b in zip(models.find_backbone(loaded).get_weights(),
                                                    models.find_backbone(source).get_weights()))
    # keras' hosted no-top files (what an offline notebook uploads) are in the legacy .h5 format
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    import h5py
    with h5py.File(tmp_path / "legacy_notop.h5", "w") as f:
        legacy.save_weights_to_hdf5_group(f, models.find_backbone(source))
    old_format = models.backbone("MobileNetV3Small", SIZE, str(tmp_path / "legacy_notop.h5"))
    assert all(np.array_equal(a, b) for a, b in zip(old_format.get_weights(),
                                                    models.find_backbone(source).get_weights()))
    # (an untrained MobileNetV3's features are tiny numbers: compare relatively)
    np.testing.assert_allclose(features(loaded), features(source), rtol=1e-5, atol=0)
    assert not np.allclose(features(fresh), features(source), rtol=1e-2, atol=0), "a fresh init differs"
    # the train stage accepts a weights file (here the tiny backbone's, to train fast), and the
    # file's content is part of the stage's fingerprint
    tiny = tmp_path / "tiny.weights.h5"
    models.find_backbone(models.build_model(config.load(ROOT / "configs" / "scratch.toml", tuple(BASE)), 4)).save_weights(tiny)
    work = tmp_path / "w"
    over = [f"model.weights={tiny}", "train.epochs=1"]
    assert run_train(work, over)["train"] == "ran"
    assert manifest(work)["inputs"]["file/model.weights"]
    with pytest.raises(StageError, match="does not fit backbone"):
        run_train(tmp_path / "w2", [f"model.weights={path}", "train.epochs=1"])  # MobileNetV3Small's file
    models.find_backbone(models.build_model(config.load(ROOT / "configs" / "scratch.toml", tuple(BASE)), 4)).save_weights(tiny)
    st = session(work, over).status(session(work).stage("train"))
    assert st.state == "stale" and "changed" in st.reason


def test_no_validation_data_monitors_training_accuracy(tmp_path):
    lines = []
    run_train(tmp_path / "w", ["split.validation=0.0", "train.epochs=2"], lines=lines)
    counts = manifest(tmp_path / "w")["counts"]
    assert "best_accuracy" in counts and "best_val_accuracy" not in counts
    assert any("no validation data" in x for x in lines)
    assert "val_accuracy" not in history(tmp_path / "w")


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    proc = subprocess_train(tmp_path / "w", "--logical-cpus", "2", "train.strategy=mirrored", "train.epochs=2")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "finished" in out, out[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in out
    assert manifest(tmp_path / "w")["counts"]["replicas"] == 2
    assert len(history(tmp_path / "w")["accuracy"]) == 2


def test_precision_auto_is_float32_on_cpu_and_mixed_keeps_a_float32_softmax():
    import keras
    from whaleid.learning import devices, model as models
    strategy = devices.make_strategy("auto")
    assert strategy.num_replicas_in_sync == 1 and devices.choose_precision("auto", strategy) == "float32"
    assert devices.choose_precision("mixed_float16", strategy) == "mixed_float16"
    with devices.dtype_policy("mixed_float16"):
        net = models.build_model(config.load(ROOT / "configs" / "scratch.toml", tuple(BASE)), 4)
    assert keras.config.dtype_policy().name == "float32", "the policy is restored after the stage"
    assert net.get_layer("logits").compute_dtype == "float16"
    out = net(images("w_red", 0).astype("float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32" and np.allclose(np.asarray(out).sum(), 1, atol=1e-3)


def test_declaring_the_stages_does_not_load_tensorflow():
    code = ("import sys, whaleid.stages, whaleid.learning.heads, whaleid.pipeline.config; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------- subprocess entry

def _main(argv):
    work, overrides, args = Path(argv[0]), [], iter(argv[1:])
    for a in args:
        if a == "--logical-cpus":
            import tensorflow as tf
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(next(args)))
        elif a == "--keras-home":
            os.environ["KERAS_HOME"] = next(args)
        else:
            overrides.append(a)
    import keras  # noqa: F401  (after KERAS_HOME and the devices are set; not part of the stage's time)
    t = time.time()
    s = session(work, overrides, echo=lambda m: print(m, flush=True))
    try:
        s.run(s.stages)
    except StageError as e:
        print(f"StageError: {e}", flush=True)
        print(f"seconds in stage: {time.time() - t:.2f}", flush=True)
        return 1
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def test_a_tie_keeps_the_later_epoch_but_patience_counts_from_the_first_best():
    from whaleid.learning.callbacks import ResumableEarlyStopping

    class Model:
        stop_training, epoch = False, -1

        def get_weights(self):
            return [self.epoch]

        def set_weights(self, w):
            self.restored = w
    stopper = ResumableEarlyStopping("val_map5", patience=2)
    model = Model()
    stopper.set_model(model)
    stopper.on_train_begin()
    for epoch, value in enumerate([0.5, 0.9, 0.9, 0.8, 0.9]):
        model.epoch = epoch
        stopper.on_epoch_end(epoch, {"val_map5": value})
        if model.stop_training:
            break
    assert epoch == 3, "patience 2 counts from epoch 1, the first 0.9: the tie at epoch 2 does not reset it"
    assert stopper.best_epoch == 2 and stopper.best_weights == [2]
    stopper.on_train_end()
    assert model.restored == [2]
