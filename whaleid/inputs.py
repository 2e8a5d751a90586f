"""The tf.data input pipelines: training batches (shuffled, or P ids x K photos for the heads that
compare photos within a batch), evaluation batches, and padded prediction batches. Every order is a
pure function of (seed, epoch), so a run resumed after a kill sees the batches an uninterrupted one
would. Images stay uint8 JPEG decodes until the batch is cast to float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from . import batches


def _decode(path, image_size: int):
    img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE")
    return tf.ensure_shape(img, [image_size, image_size, 3])


def _options():
    options = tf.data.Options()
    options.deterministic = True
    # elements come from an in-memory file list, not from files tf.data could shard by
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _to_float(images, labels):
    return tf.cast(images, tf.float32), labels


def train_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int, seed: int,
                  first_epoch: int, epochs: int):
    """Batches of epochs first_epoch .. epochs-1, back to back (fit with steps_per_epoch =
    steps(len(paths), batch_size)). Epoch e's order is a stateless shuffle seeded by (seed, e), so it
    does not depend on where a run started: a resumed run sees the orders an uninterrupted one would.
    Decoding is parallel, batches never straddle two epochs, the next batches are prefetched."""
    auto = tf.data.AUTOTUNE
    paths_t = tf.constant(paths, tf.string)
    labels_t = tf.constant(labels, tf.int32)
    n = len(paths)

    def load(i):
        return _decode(tf.gather(paths_t, i), image_size), tf.gather(labels_t, i)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return (tf.data.Dataset.from_tensor_slices(order)
                .map(load, num_parallel_calls=auto, deterministic=True)
                .batch(batch_size))

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return ds.map(_to_float, num_parallel_calls=auto).prefetch(auto).with_options(_options())


def id_batch_dataset(paths: list[str], labels: list[int], photos: list[str], image_size: int, batch_size: int,
                     per_id: int, seed: int, first_epoch: int, epochs: int):
    """The embedding heads' batches (batches.epoch_plan: P ids x K photos, a pure function of (seed,
    epoch)) for epochs first_epoch .. epochs-1; y per photo is (label, u_pos, u_neg, u_hard)."""
    auto = tf.data.AUTOTUNE
    paths_t = tf.constant(paths, tf.string)
    labels_t = tf.constant(labels, tf.float32)
    labels_np, photos_np = np.asarray(labels), np.asarray(photos)
    p, k = batches.layout(batch_size, per_id)
    slots = batches.steps_per_epoch(labels_np, batch_size, per_id) * p * k

    def plan(epoch):
        return batches.epoch_plan(labels_np, photos_np, batch_size, per_id, seed, int(epoch))

    def load(i, u):
        y = tf.concat([tf.gather(labels_t, i)[None], u], axis=0)
        return _decode(tf.gather(paths_t, i), image_size), y

    def one_epoch(epoch):
        index, u = tf.numpy_function(plan, [epoch], [tf.int32, tf.float32], stateful=False)
        index.set_shape([slots])
        u.set_shape([slots, batches.UNIFORMS])
        return (tf.data.Dataset.from_tensor_slices((index, u))
                .map(load, num_parallel_calls=auto, deterministic=True)
                .batch(p * k))

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return ds.map(_to_float, num_parallel_calls=auto).prefetch(auto).with_options(_options())


def eval_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int):
    auto = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    ds = ds.map(lambda p, y: (_decode(p, image_size), y), num_parallel_calls=auto, deterministic=True)
    return ds.batch(batch_size).map(_to_float, num_parallel_calls=auto).prefetch(auto).with_options(_options())


def steps(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


class Batches(NamedTuple):
    dataset: tf.data.Dataset
    steps: int           # per epoch
    size: int            # images per step
    images: int          # distinct images per epoch
    layout: str          # for the log


def training_batches(head, paths: list[str], labels: list[int], photos: list[str], image_size: int,
                     batch_size: int, per_id: int, seed: int, first_epoch: int, epochs: int) -> Batches:
    """Epochs first_epoch .. epochs-1 in the layout the head trains on: shuffled files, or P ids x K
    photos (batch_size rounded down to a multiple of K)."""
    if head.per_id_batches:
        p, k = batches.layout(batch_size, per_id)
        ds = id_batch_dataset(paths, labels, photos, image_size, p * k, k, seed, first_epoch, epochs)
        n_steps = batches.steps_per_epoch(labels, p * k, k)
        return Batches(ds, n_steps, p * k, n_steps * p * k, f"batches of {p} ids x {k} photos")
    ds = train_dataset(paths, labels, image_size, batch_size, seed, first_epoch, epochs)
    return Batches(ds, steps(len(paths), batch_size), batch_size, len(paths), f"shuffled batches of {batch_size}")


def padded(images: np.ndarray, rows: int) -> np.ndarray:
    """A short last batch padded with zero images to `rows`, so a model is traced for one shape only."""
    if len(images) >= rows:
        return images
    return np.concatenate([images, np.zeros((rows - len(images),) + images.shape[1:], images.dtype)])


def encode_files(encode, paths: list[str], image_size: int, batch_size: int, progress: bool = True,
                 desc: str = "embed") -> np.ndarray:
    """encode(images) over augment's image files (image_size JPEGs), batch by batch."""
    if not paths:
        return np.zeros((0, 0), np.float32)
    out = []
    ds = eval_dataset(list(paths), [0] * len(paths), image_size, batch_size)
    for images, _ in tqdm(ds.as_numpy_iterator(), total=-(-len(paths) // batch_size), desc=desc,
                          disable=not progress, unit="batch", dynamic_ncols=True, mininterval=0.5):
        out.append(encode(padded(images, batch_size))[:len(images)])
    return np.concatenate(out)
