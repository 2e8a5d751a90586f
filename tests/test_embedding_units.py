"""The embedding heads' parts on constructed inputs (no training): P x K batches, in-batch pair and
triplet selection, the losses, retrieval ranking and new_whale placement, one-shot tasks, AUC / F1."""
import math

import numpy as np
import pytest

from whaleid.learning import batches
from whaleid.similarity import gallery as retrieval
from whaleid.metrics import verification
from whaleid.similarity import answers
from whaleid.data.tables import NEW_WHALE


# ---------------------------------------------------------------- P ids x K photos

def _catalogue():
    """A long tail: id 0 with 30 files (10 photos x 3 variants), ids 1-7 with 1-6 files, id 8 with one file."""
    labels, photos = [], []
    counts = {0: 30, 1: 6, 2: 5, 3: 4, 4: 3, 5: 2, 6: 2, 7: 1, 8: 1}
    for ident, n in counts.items():
        for j in range(n):
            labels.append(ident)
            photos.append(f"{ident}_{j // 3}")
    return np.array(labels), np.array(photos)


def test_id_batches_give_every_photo_a_positive_and_other_ids():
    labels, photos = _catalogue()
    index, u = batches.epoch_plan(labels, photos, batch_size=16, per_id=4, seed=1, epoch=0)
    p, k = batches.layout(16, 4)
    assert (p, k) == (4, 4)
    steps = batches.steps_per_epoch(labels, 16, 4)
    assert index.shape == (steps * 16,) and u.shape == (steps * 16, 3)
    assert u.min() >= 0 and u.max() < 1
    assert set(index) == set(range(len(labels))), "every file is used in the epoch"
    for b in index.reshape(-1, 16):
        ids, n = np.unique(labels[b], return_counts=True)
        assert n.min() >= 2, f"an id without its positive in batch {labels[b]}"
        assert len(ids) >= 2, f"a batch of one id has no negatives: {labels[b]}"
    # a chunk of the big id spans K different photos, not K variants of one photo
    chunks = index.reshape(-1, 4)
    big = [c for c in chunks if labels[c[0]] == 0]
    assert all(len(set(photos[c])) == 4 for c in big)


def test_id_batches_are_a_pure_function_of_seed_and_epoch():
    labels, photos = _catalogue()
    a = batches.epoch_plan(labels, photos, 16, 4, seed=1, epoch=3)
    b = batches.epoch_plan(labels, photos, 16, 4, seed=1, epoch=3)
    c = batches.epoch_plan(labels, photos, 16, 4, seed=1, epoch=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert len(a[0]) == len(c[0]), "the same number of steps every epoch"


@pytest.mark.parametrize("batch, per_id, message", [(16, 1, "at least 2"), (6, 4, "fewer than 2 ids")])
def test_batch_layout_errors_name_the_setting(batch, per_id, message):
    with pytest.raises(ValueError, match=message):
        batches.layout(batch, per_id)


# ---------------------------------------------------------------- in-batch pairs (Keras ops, eager)

def test_pair_partners_labels_right_and_hard_negative_is_the_highest_scoring():
    from whaleid.learning.heads import siamese as embedding
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3])          # id 3 has no positive in this batch
    rng = np.random.default_rng(0)
    for trial in range(20):
        u = rng.random((len(labels), 3)).astype("float32")
        pos, has_pos, neg, has_neg = (np.asarray(x) for x in embedding.pair_partners(labels, u[:, 0], u[:, 1]))
        assert list(has_pos) == [True] * 7 + [False] and all(has_neg)
        for i in range(7):
            assert pos[i] != i and labels[pos[i]] == labels[i]
        assert all(labels[neg] != labels)
    logits = np.zeros((8, 8), "float32")
    logits[0, 5] = 3.0                                    # photo 0's hardest negative is photo 5
    logits[0, 1] = 9.0                                    # (its positive scores higher: not a negative)
    u = np.zeros((8, 3), "float32")
    _, _, neg, _ = embedding.pair_partners(labels, u[:, 0], u[:, 1], logits, u[:, 2] + 0.0, hard_fraction=0.5)
    assert int(np.asarray(neg)[0]) == 5
    _, _, neg, _ = embedding.pair_partners(labels, u[:, 0], u[:, 1], logits, u[:, 2] + 0.9, hard_fraction=0.5)
    assert int(np.asarray(neg)[0]) == 2, "u_hard above the fraction: the random (here first) negative"


def test_pair_loss_on_constructed_logits():
    from whaleid.learning.heads import siamese as embedding
    labels = np.array([0, 0, 1, 1], "float32")
    y = np.stack([labels, *np.random.default_rng(1).random((3, 4))], axis=1).astype("float32")
    same = labels[:, None] == labels[None, :]
    right = np.where(same, 8.0, -8.0).astype("float32")
    loss = embedding.PairLoss()
    assert float(loss(y, right)) == pytest.approx(math.log1p(math.exp(-8)), rel=1e-4)
    assert float(loss(y, -right)) == pytest.approx(8 + math.log1p(math.exp(-8)), rel=1e-4)
    assert float(loss(y, np.zeros((4, 4), "float32"))) == pytest.approx(math.log(2), rel=1e-5)
    assert float(embedding.pair_accuracy(y, right)) == 1.0 and float(embedding.pair_accuracy(y, -right)) == 0.0


# ---------------------------------------------------------------- triplet loss

def test_semi_hard_triplet_loss_on_constructed_embeddings():
    from whaleid.learning.heads import triplet as embedding
    # 1-D embeddings: anchor 0 at 0, its positive at 1 (d_ap = 1); negatives at 1.5 (d = 2.25, semi-hard
    # for margin 2) and 3 (d = 9). Semi-hard picks 2.25: loss = 1 - 2.25 + 2 = 0.75 for (0, 1).
    e = np.array([[0.0], [1.0], [1.5], [3.0]], "float32")
    labels = np.array([0, 0, 1, 1])
    terms, valid = (np.asarray(x) for x in embedding.semi_hard_triplet_terms(labels, e, margin=2.0))
    assert valid.tolist() == [[False, True, False, False], [True, False, False, False],
                              [False, False, False, True], [False, False, True, False]]
    assert terms[0, 1] == pytest.approx(0.75)
    # anchor 1 (at 1), positive 0 (d_ap 1): negatives at d 0.25 and 4; semi-hard: 4 -> 1 - 4 + 2 = 0
    assert terms[1, 0] == pytest.approx(0.0)
    # anchor 2 (1.5), positive 3 (d_ap 2.25): negatives at d 2.25 and 0.25, none farther -> the
    # farthest (2.25): 2.25 - 2.25 + 2 = 2
    assert terms[2, 3] == pytest.approx(2.0)
    loss = float(embedding.TripletLoss(margin=2.0)(labels.astype("float32"), e))
    assert loss == pytest.approx(np.sum(terms * valid) / valid.sum(), rel=1e-6)
    # well separated unit clusters: zero loss and accuracy 1; all embeddings equal: loss = margin
    sep = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], "float32")
    assert float(embedding.TripletLoss(margin=1.0)(labels.astype("float32"), sep)) == 0.0
    assert float(embedding.triplet_accuracy(labels.astype("float32"), sep)) == 1.0
    same = np.ones((4, 2), "float32") / np.sqrt(2)
    assert float(embedding.TripletLoss(margin=1.0)(labels.astype("float32"), same)) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- retrieval

@pytest.mark.parametrize("features", ["l1", "rich"])
def test_numpy_pair_scores_match_the_keras_pair_head(features):
    import keras
    from whaleid.learning.heads import siamese
    rng = np.random.default_rng(2)
    x = rng.random((6, 5)).astype("float32")
    layer = siamese.PairHead(features, name="pair_head")
    keras_logits = np.asarray(layer(x))
    kernel, bias = layer.score.get_weights()
    pair = siamese.PairWeights(kernel.reshape(-1), float(bias[0]), features)
    np.testing.assert_allclose(siamese.pair_logits(x, x, pair), keras_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(siamese.pair_logits(x, x, pair, max_elements=7), keras_logits, rtol=1e-5, atol=1e-5)
    inp = keras.Input((5,))
    net = keras.Model(inp, layer(inp))  # the head reads the pair weights from the model, as predict does
    head = siamese.Siamese(embedding_size=5, pair_features=features, hard_negatives=0.0)
    rows = head.pair_similarity(net, np.repeat(x, 6, 0), np.tile(x, (6, 1))).reshape(6, 6)
    np.testing.assert_allclose(rows, head.similarity(net, x, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head.similarity(net, x, x), 1 / (1 + np.exp(-keras_logits)), rtol=1e-5, atol=1e-6)


def test_ids_ranked_by_their_best_photo_and_new_whale_by_threshold():
    # unit embeddings at angles; the query at 0 degrees
    def unit(deg):
        r = np.deg2rad(deg)
        return [np.cos(r), np.sin(r)]
    gallery = np.array([unit(a) for a in (10, 170, 40, 90, 120)], "float32")
    ids = ["w_b", "w_b", "w_a", "w_c", "w_a"]   # w_b's best photo is at 10, w_a's at 40, w_c at 90
    from whaleid.learning.heads.softmax import Softmax
    from whaleid.learning.heads.triplet import Triplet
    triplet = Triplet(embedding_size=2, margin=1.0)
    scorer = retrieval.GalleryScorer(lambda x: x, lambda q, g: triplet.similarity(None, q, g), gallery, ids)
    assert scorer.classes == ["w_a", "w_b", "w_c"]
    scores = scorer.predict_on_batch(np.array([unit(0)], "float32"))
    expect = [(1 + np.cos(np.deg2rad(a))) / 2 for a in (40, 10, 90)]
    np.testing.assert_allclose(scores[0], expect, rtol=1e-6)
    # threshold between w_b (0.996) and w_a (0.883): new_whale second; above all: first; below all: last
    assert answers.answer(scores, scorer.classes, 0.9, "mean", None, 3) == ["w_b", NEW_WHALE, "w_a"]
    assert answers.answer(scores, scorer.classes, 0.999, "mean", None, 3) == [NEW_WHALE, "w_b", "w_a"]
    assert answers.answer(scores, scorer.classes, 0.1, "mean", None, 4) == ["w_b", "w_a", "w_c", NEW_WHALE]
    # softmax "similarity" is the probability that two photos show the same class
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(Softmax(label_smoothing=0.0).similarity(None, p, p), [[0.5, 0.5], [0.5, 1.0]])


# ---------------------------------------------------------------- verification and one-shot

def test_auc_and_f1_against_hand_worked_values():
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.4, 0.35, 0.8, 0.7, 0.1]
    # positive > negative in 3 + 2 + 2 of 9 pairs
    assert verification.roc_auc(labels, scores) == pytest.approx(7 / 9)
    # a tie counts one half: positives {0.5, 0.9}, negatives {0.5, 0.1} -> (0.5 + 1 + 1 + 1) / 4
    assert verification.roc_auc([1, 1, 0, 0], [0.5, 0.9, 0.5, 0.1]) == pytest.approx(0.875)
    assert math.isnan(verification.roc_auc([1, 1], [0.2, 0.3]))
    # >= 0.5 predicted same: 0.9 (tp), 0.8 (fp), 0.7 (tp); 0.4 missed (fn)
    r = verification.precision_recall_f1(labels, scores, 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3, abs=1e-4) and r["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["f1"] == pytest.approx(2 / 3, abs=1e-4)
    r = verification.precision_recall_f1(labels, scores, 0.95)
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)


def test_id_pairs_are_the_true_id_and_a_random_other_one():
    classes = ["w_a", "w_b", "w_c"]
    scores = np.array([[0.9, 0.2, 0.1], [0.3, 0.6, 0.8]])
    seen = set()
    for seed in range(20):
        labels, values = verification.id_pairs(scores, ["w_a", NEW_WHALE], classes, np.random.default_rng(seed))
        assert labels.tolist() == [True, False, False]
        assert values[0] == 0.9 and values[1] in (0.2, 0.1) and values[2] in (0.3, 0.6, 0.8)
        seen.add(values[2])
    assert seen == {0.3, 0.6, 0.8}, "a new whale is paired with any id"


def test_one_shot_tasks_have_one_correct_candidate_and_n_distinct_ids():
    ids = np.repeat([f"id{i}" for i in range(12)], 3)
    ids = np.append(ids, "lonely")                       # one photo: cannot be a query
    queries = np.arange(len(ids))
    tasks = verification.one_shot_tasks(ids, queries, 5, np.random.default_rng(4))
    assert len(tasks.query) == len(ids) - 1 and tasks.candidates.shape == (len(ids) - 1, 5)
    for q, cands, pos in zip(tasks.query, tasks.candidates, tasks.correct):
        assert len(set(ids[cands])) == 5, "N distinct ids"
        assert q not in cands, "the query is not its own candidate"
        assert [i for i, c in enumerate(cands) if ids[c] == ids[q]] == [pos], "exactly one correct"
    assert len(set(tasks.correct)) > 1, "the correct position varies"
    sims = np.zeros(tasks.candidates.shape)
    sims[np.arange(len(sims)), tasks.correct] = 1
    assert verification.one_shot_accuracy(sims, tasks.correct) == 1.0
    assert len(verification.one_shot_tasks(ids[:6], np.arange(6), 5, np.random.default_rng(0)).query) == 0
