"""Training batches for the embedding heads (siamese, triplet): P ids x K photos each.

A loss that compares photos inside a batch needs, for every photo, another photo of the same id in
that batch (its positive) and photos of other ids (its negatives). Random batches give neither for
the long tail (41% of the Kaggle ids have one photo), so every batch here is built from chunks of
`per_id` files of one id, and the chunks are spread over the epoch so that one batch holds several ids.

    epoch_plan(labels, photos, batch_size, per_id, seed, epoch) -> (file index, uniforms) per slot

The plan is a pure function of (seed, epoch), like the softmax head's shuffle: a training resumed
after a kill sees the batches an uninterrupted one would. Besides the file order it draws three
uniforms per slot that the siamese loss uses to pick the slot's positive and negative partner and
whether that negative is the batch's hardest (embedding.pair_partners); drawing them here keeps the
model free of random state. No TensorFlow here: train.py wraps this in tf.data.
"""
from __future__ import annotations

import numpy as np

UNIFORMS = 3  # u_pos, u_neg, u_hard


def layout(batch_size: int, per_id: int) -> tuple[int, int]:
    """(ids per batch P, photos per id K); the batch used is P*K <= batch_size."""
    if per_id < 2:
        raise ValueError(f"train.photos_per_id = {per_id}: at least 2 (a photo needs a positive in its batch)")
    if batch_size < 2 * per_id:
        raise ValueError(f"train.batch_size = {batch_size} holds fewer than 2 ids of train.photos_per_id = "
                         f"{per_id} photos: negatives need a second id; use a batch of at least {2 * per_id}")
    return batch_size // per_id, per_id


def replica_layout(batch_size: int, per_id: int, replicas: int = 1, per_replica: bool = False) -> tuple[int, int]:
    """(ids per global batch P, photos per id K) when a batch is cut into `replicas` equal contiguous
    slices (tf.distribute gives replica r rows [r*B/R, (r+1)*B/R)): P is a multiple of the replica
    count, so every replica gets whole ids, K photos each (every photo has its positives on its
    replica). per_replica (train.batch_per_replica): batch_size is one replica's batch, so P is its
    P times the replicas; otherwise P is batch_size's P rounded down to a multiple of the replicas."""
    p, k = layout(batch_size, per_id)
    if replicas <= 1:
        return p, k
    if per_replica:
        return p * replicas, k
    if p < replicas:
        raise ValueError(f"train.batch_size = {batch_size} holds {p} ids of train.photos_per_id = {per_id} photos, "
                         f"fewer than the {replicas} replicas (each needs whole ids): use a batch of at least "
                         f"{replicas * per_id * 2}, or train.batch_per_replica = true")
    return p - p % replicas, k


def _chunks_per_id(counts: np.ndarray, per_id: int) -> np.ndarray:
    return np.maximum(1, -(-counts // per_id))


def steps_per_epoch(labels, batch_size: int, per_id: int) -> int:
    p, k = layout(batch_size, per_id)
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return int(-(-_chunks_per_id(counts, k).sum() // p))


def _interleave(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One id's files, photo by photo in turn (each photo's files shuffled, photos in random order), so
    a chunk of K files holds min(K, photos) different photos rather than K variants of one."""
    groups = [rng.permutation(g) for g in groups]
    groups = [groups[i] for i in rng.permutation(len(groups))]
    out = []
    for j in range(max(len(g) for g in groups)):
        out.extend(int(g[j]) for g in groups if j < len(g))
    return np.array(out, np.int64)


def _by_encounter(members: np.ndarray, photos: np.ndarray, encounters: np.ndarray, rng) -> np.ndarray:
    """One id's files encounter by encounter in turn (each encounter's photos interleaved as
    _interleave does), so a chunk of K files holds min(K, encounters) different encounters: the
    positives a photo meets in its batch come from other encounters where the id has several, and do
    not share its background."""
    enc = encounters[members]
    lists = []
    for e in np.unique(enc):
        inside = members[enc == e]
        _, photo_of = np.unique(photos[inside], return_inverse=True)
        lists.append(_interleave([inside[photo_of == j] for j in range(photo_of.max() + 1)], rng))
    lists = [lists[i] for i in rng.permutation(len(lists))]
    out = []
    for j in range(max(len(g) for g in lists)):
        out.extend(int(g[j]) for g in lists if j < len(g))
    return np.array(out, np.int64)


def epoch_plan(labels, photos, batch_size: int, per_id: int, seed: int, epoch: int, encounters=None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(index (steps*P*K,) int32, uniforms (steps*P*K, 3) float32): consecutive P*K slots are one batch.

    Every file is used at least once per epoch. Each id is cut into ceil(n/K) chunks of K files (the last
    chunk topped up with the id's first files; an id with one file repeats it, which online
    augmentation and the offline variants make two views). The chunks of all ids are ordered by a
    stratified key, (j + u) / chunks for the id's j-th chunk, so a large id is spread evenly over the
    epoch instead of filling the last batches alone. The last batch is completed with the epoch's first chunks.
    With `encounters` (per file), an id's chunks take its encounters in turn (_by_encounter).
    """
    labels, photos = np.asarray(labels), np.asarray(photos)
    if len(labels) != len(photos) or len(labels) == 0:
        raise ValueError("epoch_plan: labels and photos must be non-empty and of the same length")
    p, k = layout(batch_size, per_id)
    rng = np.random.default_rng([int(seed), int(epoch), 0x1D])
    ids, inverse = np.unique(labels, return_inverse=True)
    chunks, keys = [], []
    for i in range(len(ids)):
        members = np.flatnonzero(inverse == i)
        if encounters is not None:
            order = _by_encounter(members, photos, np.asarray(encounters), rng)
        else:
            _, photo_of = np.unique(photos[members], return_inverse=True)
            order = _interleave([members[photo_of == j] for j in range(photo_of.max() + 1)], rng)
        n = int(_chunks_per_id(np.array([len(order)]), k)[0])
        order = np.resize(order, n * k)  # repeats the id's first files to fill the last chunk
        for j in range(n):
            chunks.append(order[j * k:(j + 1) * k])
            keys.append((j + rng.random()) / n)
    chunks = [chunks[i] for i in np.argsort(np.array(keys), kind="stable")]
    steps = -(-len(chunks) // p)
    chunks += [chunks[i % len(chunks)] for i in range(steps * p - len(chunks))]
    index = np.concatenate(chunks).astype(np.int32)
    return index, rng.random((len(index), UNIFORMS), dtype=np.float32)
