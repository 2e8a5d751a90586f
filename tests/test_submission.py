import numpy as np
import pandas as pd
import pytest

from whaleid.metrics import submission as sub
from whaleid.metrics.submission import SubmissionError
from whaleid.similarity import answers

CLASSES = [f"w_{i}" for i in range(8)]


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_average_precision_at_each_rank(rank):
    pred = ["a", "b", "c", "d", "e"]
    pred[rank - 1] = "t"
    assert sub.average_precision("t", pred) == pytest.approx(1 / rank)


def test_average_precision_absent_and_duplicates_count_once():
    assert sub.average_precision("t", ["a", "b", "c", "d", "e"]) == 0
    assert sub.average_precision("t", ["a", "a", "t", "b", "c"]) == pytest.approx(1 / 2)
    assert sub.average_precision("t", ["a", "t", "t", "b", "c"]) == pytest.approx(1 / 2)
    assert sub.average_precision("t", ["a", "b", "c", "d", "e", "t"]) == 0
    assert sub.map5(["t", "u"], [["t"], ["x", "u"]]) == pytest.approx(0.75)


def test_vote_agreement_wins_over_a_more_probable_single_version():
    probs = np.full((4, 8), 0.01)
    probs[0, 3] = 0.9          # one version is very sure of w_3
    probs[1:, 5] = 0.5         # three versions agree on w_5
    probs[1:, 3] = 0.05
    out = answers.merge_vote(probs, CLASSES, 5)
    # then every version's next candidate is w_0, w_1, w_2 (equal probabilities: the lower index first)
    assert out == ["w_5", "w_3", "w_0", "w_1", "w_2"]


def test_vote_fills_every_slot_by_agreement_then_probability():
    # worked out by hand, slot by slot (3 versions; each version's ranking skips ids already output):
    #   1: candidates 1 (.40), 2 (.45), 3 (.50), one vote each       -> w_3, the most probable
    #   2: 1 (.40) vs 2 named by two versions                        -> w_2
    #   3: 1 named by two versions vs 5 (.12)                        -> w_1
    #   4: 4 (.20, one version) vs 5 (.15, named by two versions)    -> w_5, agreement beats probability
    #   5: 4 (.20), 6 (.10), 7 (.10)                                 -> w_4
    probs = np.array([[0.01, 0.40, 0.30, 0.02, 0.20, 0.015, 0.05, 0.005],
                      [0.01, 0.25, 0.45, 0.02, 0.005, 0.15, 0.10, 0.01],
                      [0.01, 0.02, 0.20, 0.50, 0.005, 0.12, 0.03, 0.10]])
    assert answers.merge_vote(probs, CLASSES, 5) == ["w_3", "w_2", "w_1", "w_5", "w_4"]
    # mean merge: the versions' mean is w_2 .317, w_1 .223, w_3 .180, w_5 .095, w_4 .070, w_6 .060, ...
    assert answers.merge_mean(probs, CLASSES, 5) == ["w_2", "w_1", "w_3", "w_5", "w_4"]
    assert answers.merge_mean(probs, CLASSES, 7) == ["w_2", "w_1", "w_3", "w_5", "w_4", "w_6", "w_7"]
    # through answer(): the mean probabilities decide where new_whale goes (under 0.2: before w_3)
    assert answers.answer(probs, CLASSES, 0.2, "mean", None, 5) == ["w_2", "w_1", "new_whale", "w_3", "w_5"]
    # vote puts w_3 first, and its mean (.180) is under 0.2: new_whale goes before it
    assert answers.answer(probs, CLASSES, 0.2, "vote", None, 5) == ["new_whale", "w_3", "w_2", "w_1", "w_5"]


def test_vote_without_agreement_takes_the_most_probable_and_never_repeats():
    probs = np.zeros((2, 8))
    probs[0] = np.linspace(0.9, 0.1, 8)            # ranks 0,1,2,...
    probs[1] = np.linspace(0.1, 0.85, 8)           # ranks 7,6,5,...
    out = answers.merge_vote(probs, CLASSES, 5)
    assert out[:2] == ["w_0", "w_7"] and len(set(out)) == 5
    mean = answers.merge_mean(probs, CLASSES, 5)
    assert len(set(mean)) == 5


@pytest.mark.parametrize("position", [0, 1, 2, 3, 4])
def test_new_whale_inserted_before_the_first_score_under_threshold(position):
    labels = ["a", "b", "c", "d", "e"]
    scores = [0.9 - 0.1 * i for i in range(5)]
    threshold = scores[position] + 0.01
    out = answers.insert_new_whale(labels, scores, threshold, 5)
    assert out.index("new_whale") == position and len(out) == 5 and len(set(out)) == 5


def test_new_whale_takes_last_slot_when_all_scores_clear_the_threshold():
    assert answers.insert_new_whale(list("abcde"), [0.9] * 5, 0.5, 5) == ["a", "b", "c", "d", "new_whale"]


def test_known_answer_goes_first_without_repeating():
    probs = np.tile(np.linspace(0.5, 0.01, 8), (4, 1))
    out = answers.answer(probs, CLASSES, 0.3, "vote", "w_2", 5)
    assert out[0] == "w_2" and len(set(out)) == 5 and out.count("w_2") == 1
    out = answers.answer(probs, CLASSES, 0.3, "vote", "w_7", 5)
    assert out[0] == "w_7" and len(out) == 5


def _good():
    return pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": ["w_1 w_2 w_3 w_4 new_whale"] * 2})


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.iloc[:1], "missing"),
    (lambda d: d.assign(Id=["w_1 w_2 w_3 w_4", d.Id[1]]), "4 labels"),
    (lambda d: d.assign(Id=["w_1 w_2 w_3 w_4 w_5 w_6", d.Id[1]]), "6 labels"),
    (lambda d: d.assign(Id=["w_1 w_1 w_3 w_4 w_5", d.Id[1]]), "repeated label"),
    (lambda d: d.rename(columns={"Id": "Ids"}), "header"),
    (lambda d: pd.concat([d, pd.DataFrame({"Image": ["z.jpg"], "Id": [d.Id[0]]})]), "not in sample_submission"),
    (lambda d: pd.concat([d, d.iloc[:1]]), "more than once"),
])
def test_validator_rejects_each_malformed_case(mutate, message):
    sub.validate(_good(), ["a.jpg", "b.jpg"])
    with pytest.raises(SubmissionError, match=message):
        sub.validate(mutate(_good()), ["a.jpg", "b.jpg"])


def test_validator_rejects_rows_out_of_sample_submission_order():
    images = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    good = pd.DataFrame({"Image": images, "Id": ["w_1 w_2 w_3 w_4 new_whale"] * 4})
    sub.validate(good, images)
    with pytest.raises(SubmissionError, match=r"row 2 is d.jpg, expected a.jpg.*order"):
        sub.validate(good.iloc[::-1], images)
    swapped = good.iloc[[0, 2, 1, 3]]  # only the middle rows swap: the first out-of-place row is named
    with pytest.raises(SubmissionError, match=r"row 3 is c.jpg, expected b.jpg"):
        sub.validate(swapped, images)
    sub.validate(swapped, images, ordered=False)


def test_score_files(tmp_path):
    s, t = tmp_path / "s.csv", tmp_path / "t.csv"
    _good().to_csv(s, index=False)
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": ["w_2", "new_whale"]}).to_csv(t, index=False)
    r = sub.score_files(s, t)
    assert r["map5"] == pytest.approx((1 / 2 + 1 / 5) / 2) and r["all_new_whale_map5"] == 0.5 and r["top1"] == 0
    # a solution's row order means nothing: a submission in another order scores the same
    _good().iloc[::-1].to_csv(s, index=False)
    assert sub.score_files(s, t) == r


@pytest.mark.parametrize("k", [1, 3, 7])
def test_answers_hold_k_distinct_labels(k):
    probs = np.tile(np.linspace(0.5, 0.01, 8), (4, 1))
    for merge in ("vote", "mean"):
        out = answers.answer(probs, CLASSES, 0.3, merge, None, k)
        assert len(out) == k and len(set(out)) == k
    assert answers.answer(probs, CLASSES, 0.3, "vote", "w_5", k)[0] == "w_5"


def test_validator_counts_the_given_top_k_and_defaults_to_the_shipped_setting():
    from whaleid.pipeline import config
    three = pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": ["w_1 w_2 new_whale"] * 2})
    sub.validate(three, ["a.jpg", "b.jpg"], 3)
    with pytest.raises(SubmissionError, match="3 labels, expected exactly 5"):
        sub.validate(three, ["a.jpg", "b.jpg"])  # default: the shipped predict.top_k
    assert config.defaults()["predict"]["top_k"] == 5
    with pytest.raises(SubmissionError, match="5 labels, expected exactly 3"):
        sub.validate(_good(), ["a.jpg", "b.jpg"], 3)


def _check_folder(tmp_path, labels):
    data = tmp_path / "data"
    data.mkdir(parents=True)
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": ["new_whale"] * 2}).to_csv(data / "sample_submission.csv", index=False)
    f = tmp_path / "s.csv"
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": [labels] * 2}).to_csv(f, index=False)
    return data, f


def test_predict_check_uses_the_configured_top_k(tmp_path):
    from conftest import cli
    data, f = _check_folder(tmp_path, "w_1 w_2 new_whale")
    code, out = cli("predict", "--work", tmp_path / "w", "--data", data, "--check", f, "--set", "predict.top_k=3")
    assert code == 0 and "valid (2 images, 3 distinct labels each)" in out, out
    code, out = cli("predict", "--work", tmp_path / "w", "--data", data, "--check", f)
    assert code != 0 and "3 labels, expected exactly 5" in out, out
    data5, f5 = _check_folder(tmp_path / "five", "w_1 w_2 w_3 w_4 new_whale")
    code, out = cli("predict", "--work", tmp_path / "w5", "--data", data5, "--check", f5)
    assert code == 0 and "5 distinct labels each" in out, out


def test_predict_check_rejects_a_file_out_of_order(tmp_path):
    from conftest import cli
    data, f = _check_folder(tmp_path, "w_1 w_2 w_3 w_4 new_whale")
    code, out = cli("predict", "--work", tmp_path / "w", "--data", data, "--check", f)
    assert code == 0, out
    rows = pd.read_csv(f)
    rows.iloc[::-1].to_csv(f, index=False)
    code, out = cli("predict", "--work", tmp_path / "w", "--data", data, "--check", f)
    assert code != 0 and "row 2 is b.jpg, expected a.jpg" in out and "order" in out, out
