"""Several replicas on one machine, on CPU: logical CPU devices stand in for GPUs (they must be set
before TensorFlow starts, so those parts run in a subprocess: `python tests/test_replicas.py heads
OUT.json` or `... train WORK [--as-gpu-machine N] [key=value ...]`).

    - the embedding heads' in-batch losses on 2 and 4 replicas: every photo has its positives on its
      replica, and loss, metric and the SGD step (so the gradients) equal one device's on the same batch
    - mixed precision with an overflow on one replica: the step is skipped on every replica (Keras'
      own LossScaleOptimizer lets it reach the weights)
    - a checkpoint written under mixed precision on 2 replicas restores on one float32 device, and a
      run killed on one float32 device resumes on a (simulated) 2-GPU machine in mixed precision
    - softmax on 4 replicas with a batch that does not divide the training set: full batches, every
      batch-norm statistic finite, validation equal to a one-device evaluate of the saved model
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import test_train as tt
from test_train import BASE, ROOT, SIZE, crash_at, history, manifest, run_train, session

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

FEATURES, P_IDS, K = 6, 8, 2       # the heads' batch: 8 ids x 2 photos = 16 rows


# ---------------------------------------------------------------- the heads' batch and models

def heads_batch():
    """One P x K batch from batches.epoch_plan (8 ids, 3 files each): features, y rows, labels."""
    from whaleid.learning import batches
    labels = np.repeat(np.arange(P_IDS), 3)
    photos = np.array([f"{i}_{j}" for i, j in zip(labels, np.tile(np.arange(3), P_IDS))])
    index, u = batches.epoch_plan(labels, photos, P_IDS * K, K, seed=3, epoch=0)
    index, u = index[:P_IDS * K], u[:P_IDS * K]
    x = np.random.default_rng(5).normal(size=(len(labels), FEATURES)).astype("float32")[index]
    y = np.concatenate([labels[index][:, None].astype("float32"), u], axis=1)
    return x, y, labels[index]


def build_head_model(name: str, seed: int = 0):
    import keras
    from whaleid.learning.heads import arcface, siamese, triplet
    from whaleid.learning.heads.base import L2Normalize
    inp = keras.Input((FEATURES,))
    if name == "siamese":
        emb = keras.layers.Dense(4, activation="sigmoid", name="embedding")(inp)
        out, loss, metric = siamese.PairHead("rich", name="pair_head")(emb), siamese.PairLoss(0.5), siamese.pair_accuracy_rows
    elif name == "triplet":
        emb = L2Normalize(name="embedding")(keras.layers.Dense(4, name="embedding_dense")(inp))
        out, loss, metric = emb, triplet.TripletLoss(0.5), triplet.triplet_accuracy_rows
    else:
        emb = L2Normalize(name="embedding")(keras.layers.Dense(4, name="embedding_dense")(inp))
        out = arcface.CosineCentres(P_IDS, 2, name="centres")(emb)
        loss = arcface.ArcFaceLoss(arcface.id_margins(np.arange(1, P_IDS + 1), 0.5, True), 30.0)
        metric = None
    net = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    net.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in net.get_weights()])
    metrics = [keras.metrics.MeanMetricWrapper(metric, name="accuracy")] if metric else []
    net.compile(keras.optimizers.SGD(0.5), loss, metrics=metrics)
    return net


def one_step(strategy, name: str) -> dict:
    """Loss, metric and weights after one SGD step on heads_batch() (one global batch of 16 rows)."""
    import tensorflow as tf
    x, y, _ = heads_batch()
    with strategy.scope():
        net = build_head_model(name)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
    h = net.fit(ds, epochs=1, verbose=0, shuffle=False).history
    return {"loss": h["loss"][0], "accuracy": h.get("accuracy", [None])[0],
            "weights": [w.tolist() for w in net.get_weights()]}


def overflow_step(strategy, safe: bool) -> dict:
    """Mixed float16, one SGD step on a batch whose last replica's rows overflow float16."""
    import keras
    import tensorflow as tf
    from whaleid.learning import devices
    replicas = strategy.num_replicas_in_sync
    x = np.ones((4 * replicas, 4), "float32")
    x[-4:] = 7e4                                  # the last replica's slice: inf in float16
    with devices.dtype_policy("mixed_float16"), strategy.scope():
        inp = keras.Input((4,))
        net = keras.Model(inp, keras.layers.Dense(1)(inp))
        opt = keras.optimizers.SGD(0.1)
        net.compile(devices.loss_scale_optimizer(opt) if safe else keras.optimizers.LossScaleOptimizer(opt), "mse")
    before = [w.copy() for w in net.get_weights()]
    net.fit(tf.data.Dataset.from_tensor_slices((x, np.ones((len(x), 1), "float32"))).batch(len(x)),
            epochs=1, verbose=0, shuffle=False)
    after = net.get_weights()
    return {"finite": bool(all(np.isfinite(w).all() for w in after)),
            "unchanged": bool(all(np.array_equal(a, b) for a, b in zip(before, after))),
            "scale": float(net.optimizer.dynamic_scale.numpy())}


def mixed_checkpoint(strategy, folder: Path) -> None:
    """A checkpoint of a mixed-precision model on `strategy` after one step (optimizer state set)."""
    import keras
    import tensorflow as tf
    from whaleid.learning import devices
    from whaleid.learning.checkpoint import Checkpoint
    x, y, _ = heads_batch()
    with devices.dtype_policy("mixed_float16"), strategy.scope():
        net = build_head_model("triplet")
        net.compile(devices.loss_scale_optimizer(keras.optimizers.Adam(0.01)), net.loss)
    net.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)), epochs=1, verbose=0, shuffle=False)
    Checkpoint(folder).save(net, {"epochs_done": 1, "history": []}, None, None)
    np.save(folder / "weights.npy", np.concatenate([w.ravel() for w in net.get_weights()]))
    np.save(folder / "inner.npy", np.concatenate([np.ravel(v.numpy()) for v in net.optimizer.inner_optimizer.variables]))


def logical_cpus(n: int):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _heads_main(replicas: int, out: Path) -> None:
    """One MirroredStrategy per process (a second one's collectives would clash with the first's)."""
    import tensorflow as tf
    strategy = tf.distribute.MirroredStrategy(logical_cpus(replicas))
    results = {}
    for head in ("siamese", "triplet", "arcface"):
        results[f"{head}/{replicas}"] = one_step(strategy, head)
    if replicas == 2:
        mixed_checkpoint(strategy, out.parent)
    if replicas == 4:
        results["overflow/safe"] = overflow_step(strategy, safe=True)
        results["overflow/stock"] = overflow_step(strategy, safe=False)  # last: it leaves NaNs about
    out.write_text(json.dumps(results))


def _train_main(argv) -> int:
    """test_train's subprocess entry, optionally as a machine with N GPUs: strategy auto -> a
    MirroredStrategy over N logical CPUs, precision auto -> mixed_float16 (what auto picks on GPUs)."""
    work, args, overrides, gpus = Path(argv[0]), iter(argv[1:]), [], 0
    for a in args:
        if a == "--as-gpu-machine":
            gpus = int(next(args))
        elif a == "--logical-cpus":
            logical_cpus(int(next(args)))
        else:
            overrides.append(a)
    if gpus:
        import tensorflow as tf
        from whaleid.learning import devices
        names = logical_cpus(gpus)
        make, choose = devices.make_strategy, devices.choose_precision
        devices.make_strategy = lambda name, echo=print: tf.distribute.MirroredStrategy(names) if name == "auto" else make(name, echo)
        devices.choose_precision = lambda setting, s: "mixed_float16" if setting == "auto" else choose(setting, s)
    s = session(work, overrides, echo=lambda m: print(m, flush=True))
    s.run(s.stages)
    print("finished", flush=True)
    return 0


def subprocess_start(*args):
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def finished(proc, timeout=600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def subprocess_run(*args, timeout=600) -> str:
    return finished(subprocess_start(*args), timeout)


# ---------------------------------------------------------------- tests

def test_whole_ids_on_every_replica():
    from whaleid.learning import batches
    labels = np.repeat(np.arange(30), 5)
    photos = np.array([f"{i}_{j}" for i, j in zip(labels, np.tile(np.arange(5), 30))])
    for replicas, batch, per_replica in ((2, 16, False), (4, 16, False), (4, 100, False), (3, 8, True)):
        p, k = batches.replica_layout(batch, 4, replicas, per_replica)
        assert p % replicas == 0 and p * k <= (batch * replicas if per_replica else batch)
        index, _ = batches.epoch_plan(labels, photos, p * k, k, seed=1, epoch=0)
        for b in index.reshape(-1, p * k):
            for part in np.split(labels[b], replicas):  # tf.distribute's contiguous slices
                _, n = np.unique(part, return_counts=True)
                assert n.min() >= 2, f"a photo without its positive on its replica: {part}"
    with pytest.raises(ValueError, match="train.batch_per_replica"):
        batches.replica_layout(8, 4, 4)


@pytest.fixture(scope="module")
def on_replicas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    procs = [subprocess_start("heads", n, folder / f"{n}.json") for n in (2, 4)]  # side by side
    for p in procs:
        finished(p)
    return {**json.loads((folder / "2.json").read_text()), **json.loads((folder / "4.json").read_text())}, folder


@pytest.mark.parametrize("head", ["siamese", "triplet", "arcface"])
def test_in_batch_losses_on_2_and_4_replicas_equal_one_device(on_replicas, head):
    import tensorflow as tf
    results, _ = on_replicas
    one = one_step(tf.distribute.get_strategy(), head)
    for replicas in (2, 4):
        got = results[f"{head}/{replicas}"]
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-5), (replicas, got["loss"], one["loss"])
        if one["accuracy"] is not None:
            assert got["accuracy"] == pytest.approx(one["accuracy"], rel=1e-5, abs=1e-6)
        for a, b in zip(got["weights"], one["weights"]):  # one SGD step: equal gradients
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-5, atol=2e-6, err_msg=f"{head} on {replicas}")


def test_an_overflow_on_one_replica_skips_the_step_on_every_replica(on_replicas):
    results, _ = on_replicas
    safe, stock = results["overflow/safe"], results["overflow/stock"]
    assert safe["finite"] and safe["unchanged"] and safe["scale"] == 2.0 ** 14, safe  # halved from 2^15
    assert not stock["finite"], "Keras' own LossScaleOptimizer should show the problem this guards against"


def test_a_mixed_precision_checkpoint_of_2_replicas_restores_on_one_float32_device(on_replicas):
    import keras
    from whaleid.learning.checkpoint import Checkpoint
    _, folder = on_replicas
    net = build_head_model("triplet")
    net.compile(keras.optimizers.Adam(0.01), net.loss)
    net.optimizer.build(net.trainable_variables)
    state, _ = Checkpoint(folder).load(net)
    assert state["epochs_done"] == 1
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in net.get_weights()]), np.load(folder / "weights.npy"))
    np.testing.assert_array_equal(np.concatenate([np.ravel(v.numpy()) for v in net.optimizer.variables]),
                                  np.load(folder / "inner.npy"))


def test_a_run_killed_on_a_cpu_resumes_on_a_mixed_precision_multi_gpu_machine(tmp_path, monkeypatch):
    work = tmp_path / "w"
    settings = ["train.epochs=2", "train.strategy=auto", "train.precision=auto"]
    with monkeypatch.context() as m:
        crash_at(m, "train.epoch_saved", 1)
        with pytest.raises(tt.Crash):
            session(work, settings).run(session(work).stages)
    out = subprocess_run("train", work, "--as-gpu-machine", 2, *settings)
    assert "resuming from the checkpoint of epoch 1" in out and "2 replica(s), mixed_float16" in out, out[-3000:]
    m = manifest(work)
    assert m["resumed"] and m["counts"]["resumed_from_epoch"] == 1 and m["counts"]["epochs"] == 2
    assert m["counts"]["precision"] == "mixed_float16" and m["counts"]["replicas"] == 2
    from whaleid.learning import model as models
    net = models.load_model(work / "train" / "model.keras")
    assert {layer.compute_dtype for layer in net.layers + models.find_backbone(net).layers} == {"float32"}, \
        "the saved model computes in float32 (a CPU-only machine predicts without float16)"


def test_softmax_on_4_replicas_with_a_remainder_batch(tmp_path):
    work = tmp_path / "w"
    # 32 training files, batch 12: 3 full batches of 12 (the last completed with the epoch's first files)
    out = subprocess_run("train", work, "--logical-cpus", 4, "train.strategy=mirrored", "train.batch_size=12",
                         "train.epochs=3", "model.bn_momentum=0.5")
    assert "MirroredStrategy with 4 replica(s)" in out and "shuffled batches of 12 (3 per replica)" in out, out[-2000:]
    from whaleid.learning import model as models
    net = models.load_model(work / "train" / "model.keras")
    stats = [w for layer in models.find_backbone(net).layers if "bn" in layer.name
             for w in layer.get_weights()]
    assert stats and all(np.isfinite(w).all() for w in stats)
    hist = history(work)
    best = manifest(work)["counts"]["best_epoch"] - 1
    loss, accuracy = tt._evaluate(work)
    assert abs(loss - hist["val_loss"][best]) < 1e-5 and abs(accuracy - hist["val_accuracy"][best]) < 1e-9, (loss, hist)


if __name__ == "__main__":
    if sys.argv[1] == "heads":
        _heads_main(int(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(_train_main(sys.argv[2:]))
