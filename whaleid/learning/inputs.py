"""The tf.data input pipelines: training batches (shuffled, or P ids x K photos for the heads that
compare photos within a batch), evaluation batches, and padded prediction batches. Every order is a
pure function of (seed, epoch), so a run resumed after a kill sees the batches an uninterrupted one
would.

Images stay uint8 (the JPEG decodes) all the way to the model, which casts them to float32 on its
device as its first step: a quarter of the bytes through the host and the host-to-device copy.

Several replicas: every training batch is full (an epoch's last batch is completed with the epoch's
first files), so no replica ever gets an empty or short slice (an empty slice would make its
batch-norm statistics NaN), and a global batch of B rows gives each of the R replicas B/R of them.
Several workers (Shard): each worker reads and decodes only the files of its own replicas' slices.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from whaleid.learning import batches


def _decode(path, image_size: int):
    img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE")
    return tf.ensure_shape(img, [image_size, image_size, 3])


def _options():
    options = tf.data.Options()
    options.deterministic = True
    # elements come from an in-memory file list, not from files tf.data could shard by
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


class Shard(NamedTuple):
    """One worker's part of every global batch: the rows of replicas first .. first+local-1 of
    `replicas` (equal contiguous slices of the global batch, as tf.distribute cuts it), batched per
    replica (distribute_datasets_from_function hands a worker's replicas consecutive elements)."""
    first: int       # the worker's first replica (its id in the cluster x its local replicas)
    local: int       # the worker's replicas
    replicas: int    # all replicas


def _select(slots, batch_size: int, shard: Shard | None):
    """A flat epoch of `steps * batch_size` slots (any trailing shape) -> the shard's slots, in order."""
    if shard is None:
        return slots
    per = batch_size // shard.replicas
    grid = tf.reshape(slots, tf.concat([[-1, batch_size], tf.shape(slots)[1:]], 0))
    mine = grid[:, shard.first * per:(shard.first + shard.local) * per]
    return tf.reshape(mine, tf.concat([[-1], tf.shape(slots)[1:]], 0))


def _batch_rows(batch_size: int, shard: Shard | None) -> int:
    return batch_size if shard is None else batch_size // shard.replicas


def full_epoch_order(n: int, batch_size: int, seed: int, epoch):
    """Epoch `epoch`'s file order (a stateless shuffle seeded by (seed, epoch)), completed to whole
    batches with its own first files (steps(n, batch_size) * batch_size slots)."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))
    total = steps(n, batch_size) * batch_size
    return tf.tile(order, [-(-total // n)])[:total]


def train_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int, seed: int,
                  first_epoch: int, epochs: int, shard: Shard | None = None):
    """Batches of epochs first_epoch .. epochs-1, back to back (fit with steps_per_epoch =
    steps(len(paths), batch_size)). Epoch e's order is a stateless shuffle seeded by (seed, e), so it
    does not depend on where a run started: a resumed run sees the orders an uninterrupted one would.
    Every batch is full (full_epoch_order). Decoding is parallel, batches never straddle two epochs,
    the next batches are prefetched. With a shard: this worker's rows only, per replica."""
    auto = tf.data.AUTOTUNE
    paths_t = tf.constant(paths, tf.string)
    labels_t = tf.constant(labels, tf.int32)
    n = len(paths)

    def load(i):
        return _decode(tf.gather(paths_t, i), image_size), tf.gather(labels_t, i)

    def one_epoch(epoch):
        order = _select(full_epoch_order(n, batch_size, seed, epoch), batch_size, shard)
        return (tf.data.Dataset.from_tensor_slices(order)
                .map(load, num_parallel_calls=auto, deterministic=True)
                .batch(_batch_rows(batch_size, shard)))

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return ds.prefetch(auto).with_options(_options())


def id_batch_dataset(paths: list[str], labels: list[int], photos: list[str], image_size: int, batch_size: int,
                     per_id: int, seed: int, first_epoch: int, epochs: int, shard: Shard | None = None,
                     encounters: list[str] | None = None):
    """The embedding heads' batches (batches.epoch_plan: P ids x K photos, a pure function of (seed,
    epoch)) for epochs first_epoch .. epochs-1; y per photo is (label, u_pos, u_neg, u_hard). With
    a shard: this worker's rows only, per replica."""
    auto = tf.data.AUTOTUNE
    paths_t = tf.constant(paths, tf.string)
    labels_t = tf.constant(labels, tf.float32)
    labels_np, photos_np = np.asarray(labels), np.asarray(photos)
    p, k = batches.layout(batch_size, per_id)
    slots = batches.steps_per_epoch(labels_np, batch_size, per_id) * p * k

    def plan(epoch):
        return batches.epoch_plan(labels_np, photos_np, batch_size, per_id, seed, int(epoch), encounters)

    def load(i, u):
        y = tf.concat([tf.gather(labels_t, i)[None], u], axis=0)
        return _decode(tf.gather(paths_t, i), image_size), y

    def one_epoch(epoch):
        index, u = tf.numpy_function(plan, [epoch], [tf.int32, tf.float32], stateful=False)
        index.set_shape([slots])
        u.set_shape([slots, batches.UNIFORMS])
        index, u = _select(index, p * k, shard), _select(u, p * k, shard)
        return (tf.data.Dataset.from_tensor_slices((index, u))
                .map(load, num_parallel_calls=auto, deterministic=True)
                .batch(_batch_rows(p * k, shard)))

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return ds.prefetch(auto).with_options(_options())


def eval_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int):
    """(uint8 images, labels) in file order, the last batch short."""
    auto = tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    ds = ds.map(lambda p, y: (_decode(p, image_size), y), num_parallel_calls=auto, deterministic=True)
    return ds.batch(batch_size).prefetch(auto).with_options(_options())


def load_images(paths: list[str], image_size: int, batch_size: int = 64) -> np.ndarray:
    """Every file decoded once, (n, size, size, 3) uint8 (what validation keeps in memory)."""
    if not paths:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.concatenate([x for x, _ in eval_dataset(list(paths), [0] * len(paths), image_size,
                                                      batch_size).as_numpy_iterator()])


def steps(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def global_batch(batch_size: int, replicas: int, per_replica: bool) -> int:
    """The shuffled batch over all replicas: train.batch_size x replicas (train.batch_per_replica), or
    train.batch_size rounded down to a multiple of the replicas (equal slices)."""
    if replicas <= 1:
        return batch_size
    if per_replica:
        return batch_size * replicas
    if batch_size < replicas:
        raise ValueError(f"train.batch_size = {batch_size} is smaller than the {replicas} replicas: use a batch of "
                         f"at least {replicas}, or train.batch_per_replica = true")
    return batch_size - batch_size % replicas


class Batches(NamedTuple):
    dataset: tf.data.Dataset
    steps: int           # per epoch
    size: int            # images per step (all replicas)
    images: int          # images per epoch (steps x size)
    layout: str          # for the log


def training_batches(head, paths: list[str], labels: list[int], photos: list[str], image_size: int,
                     batch_size: int, per_id: int, seed: int, first_epoch: int, epochs: int,
                     replicas: int = 1, per_replica: bool = False, shard: Shard | None = None,
                     encounters: list[str] | None = None) -> Batches:
    """Epochs first_epoch .. epochs-1 in the layout the head trains on: shuffled files, or P ids x K
    photos (batch_size rounded down to a multiple of K; P to a multiple of the replicas), for
    `replicas` replicas (global batches; with a shard, this worker's per-replica batches). `encounters`
    (per file): P x K batches take an id's encounters in turn (batches.epoch_plan)."""
    per = f" ({{}} per replica)" if replicas > 1 else ""
    if head.per_id_batches:
        p, k = batches.replica_layout(batch_size, per_id, replicas, per_replica)
        ds = id_batch_dataset(paths, labels, photos, image_size, p * k, k, seed, first_epoch, epochs, shard, encounters)
        n_steps = batches.steps_per_epoch(labels, p * k, k)
        return Batches(ds, n_steps, p * k, n_steps * p * k,
                       f"batches of {p} ids x {k} photos" + per.format(f"{p // replicas} ids"))
    size = global_batch(batch_size, replicas, per_replica)
    ds = train_dataset(paths, labels, image_size, size, seed, first_epoch, epochs, shard)
    n_steps = steps(len(paths), size)
    return Batches(ds, n_steps, size, n_steps * size, f"shuffled batches of {size}" + per.format(size // replicas))


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
