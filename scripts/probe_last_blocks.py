"""Fine-tuning only the last blocks, screened fast: the frozen part of the pretrained EfficientNet-Lite
runs once per photo (its output cached), then the last blocks + GeM + a 256-d embedding train with an
ArcFace loss on the train-only individuals (`import-folders --train-only`), and every epoch the closed-set
top-1 (1-NN, cosine) of the tested individuals' queries against their gallery is printed.

    python scripts/probe_last_blocks.py --data DIR [--backbone EfficientNetLite0] [--size 224]
                                        [--cut block14_add] [--epochs 15] [--lr 1e-4] [--crop whole|subject]
                                        [--train-on extra|gallery|both] [--seed 0]

What it tells: whether identity learnt from OTHER individuals transfers to the tested ones when the
ImageNet features below --cut are kept, per learning rate and input size, for minutes of CPU instead of
the hours a full fine-tune takes here. --train-on gallery trains on the tested individuals' own train
photos (as the pipeline trains them), both on those and the train-only ones. "pooled" ranks by the
tail's GeM features without the embedding layer; "mixed" by the sum of the two cosines. No augmentation (the cached
features are of the photo as it is) apart from mirror images of the cached inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from probe_reid_transfer import load  # noqa: E402
from whaleid.data.tables import NEW_WHALE  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--backbone", default="EfficientNetLite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cut", default="block14_add", help="layer whose output is cached; the rest trains")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3, help="the new embedding layer's rate")
    ap.add_argument("--margin", type=float, default=0.3)
    ap.add_argument("--scale", type=float, default=30.0)
    ap.add_argument("--crop", default="whole")
    ap.add_argument("--train-on", choices=("extra", "gallery", "both"), default="extra",
                    help="the train-only individuals, the tested ones' gallery photos, or both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args(argv)
    import keras
    import tensorflow as tf
    from whaleid.backbones import efficientnet_lite as lite
    keras.utils.set_random_seed(args.seed)
    cache = args.cache or args.data.parent / f"probe_cache_{args.data.name}"
    cache.mkdir(parents=True, exist_ok=True)

    train = pd.read_csv(args.data / "train.csv", dtype=str, keep_default_na=False)
    extra_ids = set(pd.read_csv(args.data / "train_only.csv", dtype=str).Id)
    solution = pd.read_csv(args.data / "solution.csv", dtype=str, keep_default_na=False)
    rows = pd.concat([train[train.Id != NEW_WHALE].assign(folder="train"),
                      solution[solution.Id != NEW_WHALE].assign(folder="test")], ignore_index=True)
    ids = rows.Id.to_numpy()
    is_query = (rows.folder == "test").to_numpy()
    is_gallery = ~rows.Id.isin(extra_ids).to_numpy() & ~is_query
    is_extra = rows.Id.isin(extra_ids).to_numpy() & ~is_query
    is_train = {"extra": is_extra, "gallery": is_gallery, "both": is_extra | is_gallery}[args.train_on]

    net = lite.build(args.size, "imagenet", variant=args.backbone)
    file = cache / f"cut_{args.backbone}_{args.size}_{args.crop}_{args.cut}.npy"
    if file.exists():
        cut = np.load(file)
    else:
        t = time.time()
        front = keras.Model(net.input, net.get_layer(args.cut).output)
        boxes_file = cache / "subject_boxes.npz"
        box_cache = dict(np.load(boxes_file, allow_pickle=True)["boxes"].item()) if boxes_file.exists() else {}
        out = []
        for i in range(0, len(rows), 32):
            b = rows.iloc[i:i + 32]
            x = np.stack([load(args.data / f / im, args.crop, args.size, box_cache) for f, im in zip(b.folder, b.Image)])
            x = np.concatenate([x, x[:, :, ::-1]])          # and the mirror images
            y = np.asarray(front.predict_on_batch(lite.preprocess_input(x.astype(np.float32))))
            out.append(np.stack([y[:len(b)], y[len(b):]], axis=1))
        cut = np.concatenate(out).astype(np.float16)
        np.save(file, cut)
        print(f"cached {file.name} {cut.shape} in {time.time() - t:.0f} s", flush=True)

    # the trainable tail: a copy of the network from the cut to the head, ImageNet weights
    tail_in = keras.Input(cut.shape[2:])
    tail = keras.Model(net.get_layer(args.cut).output, net.get_layer("head_relu").output)
    head_map = tail(tail_in)
    gem = keras.ops.mean(keras.ops.maximum(head_map, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    emb_layer = keras.layers.Dense(256, use_bias=False, name="embedding")
    emb = keras.ops.normalize(emb_layer(gem), axis=-1)
    model = keras.Model(tail_in, [emb, keras.ops.normalize(gem, axis=-1)])
    for layer in tail.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False               # keep ImageNet's statistics

    classes = sorted(set(ids[is_train]))
    index = {c: i for i, c in enumerate(classes)}
    centres = keras.Variable(keras.random.normal((256, len(classes)), seed=args.seed) * 0.05)
    x_train = np.flatnonzero(is_train)
    y_train = np.array([index[i] for i in ids[is_train]])
    opt_tail = keras.optimizers.Adam(args.lr)
    opt_head = keras.optimizers.Adam(args.head_lr)
    cos_m, sin_m = np.cos(args.margin), np.sin(args.margin)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            e, _ = model(x, training=True)
            c = tf.matmul(e, tf.math.l2_normalize(centres, axis=0))
            onehot = tf.one_hot(y, len(classes))
            sin = tf.sqrt(tf.maximum(1.0 - c * c, 1e-7))
            logits = args.scale * tf.where(onehot > 0, c * cos_m - sin * sin_m, c)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))
        tail_vars = tail.trainable_variables
        head_vars = emb_layer.trainable_variables + [centres]
        grads = tape.gradient(loss, tail_vars + head_vars)
        opt_tail.apply_gradients(zip(grads[:len(tail_vars)], tail_vars))
        opt_head.apply_gradients(zip(grads[len(tail_vars):], head_vars))
        return loss

    def evaluate():
        e, g = [], []
        for i in range(0, len(rows), 64):
            a, b = model.predict_on_batch(cut[i:i + 64, 0].astype(np.float32))
            e.append(np.asarray(a))
            g.append(np.asarray(b))
        e, g = np.concatenate(e), np.concatenate(g)
        out = {}
        for name, sim in (("learnt", e[is_query] @ e[is_gallery].T), ("pooled", g[is_query] @ g[is_gallery].T),
                          ("mixed", e[is_query] @ e[is_gallery].T + g[is_query] @ g[is_gallery].T)):
            out[name] = float(np.mean(ids[is_gallery][np.argmax(sim, axis=1)] == ids[is_query]))
        return out

    print(f"{args.backbone} {args.size} px {args.crop}, trains after {args.cut}: {len(x_train)} photos of "
          f"{len(classes)} ids (x2 mirrored), lr {args.lr}, head lr {args.head_lr}; gallery {is_gallery.sum()}, "
          f"queries {is_query.sum()}", flush=True)
    print(f"epoch 0: closed-set top-1 {evaluate()}", flush=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(0, len(order), 32):
            pick = order[i:i + 32]
            mirror = rng.integers(0, 2, len(pick))
            x = cut[x_train[pick], mirror].astype(np.float32)
            losses.append(float(step(x, y_train[pick])))
        print(f"epoch {epoch}: loss {np.mean(losses):.3f} closed-set top-1 {evaluate()} "
              f"({(time.time() - t0) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
