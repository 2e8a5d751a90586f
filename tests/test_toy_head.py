"""A new head needs one class and one registry line, nothing else: a toy head (a cosine classifier:
unit embedding, softmax over scaled cosines to one weight vector per id; ranked by retrieval) is
declared here, registered, trained by the real train stage on test_train's synthetic set, and its
saved model scored photo to photo by its own similarity."""
import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from keras import ops

from test_train import run_train

from whaleid.learning import heads
from whaleid.pipeline import head_names
from whaleid.learning.heads.base import Head, L2Normalize


@keras.saving.register_keras_serializable(package="whaleid_test")
class CosineLogits(keras.layers.Layer):
    def __init__(self, n_classes: int, scale: float = 10.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.n_classes, self.scale = n_classes, scale

    def build(self, input_shape):
        self.w = self.add_weight(shape=(int(input_shape[-1]), self.n_classes), initializer="glorot_uniform", name="w")

    def call(self, x):
        w = self.w / ops.sqrt(ops.maximum(ops.sum(self.w * self.w, axis=0, keepdims=True), 1e-12))
        return ops.softmax(self.scale * ops.matmul(x, w))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes, "scale": self.scale}


class ToyCosine(Head):
    name = "toy_cosine"
    SETTINGS = ("model.embedding_size",)

    def outputs(self, pooled, n_classes):
        emb = L2Normalize(name="embedding")(keras.layers.Dense(self.embedding_size, name="toy_dense")(pooled))
        return CosineLogits(n_classes, name="toy_logits")(emb)

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(name="loss")

    def metrics(self, n_classes):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def similarity(self, net, Q, G):
        return np.clip(0.5 * (1 + np.asarray(Q) @ np.asarray(G).T), 0, 1)


def test_a_head_declared_in_a_test_file_trains_through_the_train_stage(tmp_path, monkeypatch):
    monkeypatch.setitem(head_names.REGISTRY, "toy_cosine", ToyCosine)
    work = tmp_path / "w"
    lines = []
    out = run_train(work, ["model.head=toy_cosine", "model.embedding_size=8", "train.epochs=3"], lines=lines)
    assert out["train"] == "ran", lines
    m = json.loads((work / "train" / "manifest.json").read_text())
    assert m["settings"]["model.head"] == "toy_cosine"
    # validated by retrieval, as the base Head says: early stopping followed val_map5
    assert "best_val_map5" in m["counts"], m["counts"]
    assert any("toy_cosine head" in line for line in lines), lines

    from whaleid.learning import model as models
    from whaleid.inference.embedding import Embedder
    net = models.load_model(work / "train" / "model.keras")
    e = Embedder(net)
    assert isinstance(e.head, ToyCosine) and e.head.embedding_size == 8
    files = pd.read_csv(work / "split" / "train_files.csv")
    originals = files[files.File.str.endswith("_0.jpg")]
    vectors = e.encode_files([str(work / "augment" / "images" / f) for f in originals.File], 48, 8, progress=False)
    assert vectors.shape == (len(originals), 8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # its own similarity: a photo is most similar to itself
    s = e.similarity(vectors, vectors)
    assert (np.argmax(s, axis=1) == np.arange(len(vectors))).all()


def test_an_unregistered_head_is_refused_at_load_time(tmp_path):
    from conftest import cli
    code, out = cli("status", "--work", tmp_path, "--set", "model.head=nonesuch")
    assert code != 0 and "model.head" in out and "softmax" in out, out
    assert "Traceback" not in out
    assert not (Path(tmp_path) / "train").exists()
