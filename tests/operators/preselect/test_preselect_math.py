"""PreSelect math (operators/preselect/math.py): expectations are worked out by hand in comments."""

from __future__ import annotations

import math
import random

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jobs.train.preselect import train_isolated
from operators.preselect.math import (
    bits_per_char,
    choose_labels,
    normalize_column_for_fasttext,
    normalize_for_fasttext,
    predictive_strength,
)
from operators.preselect.scorer import load_scorer, score_texts
from operators.selection import select_threshold, select_top_fraction_by_chars

# ---------------------------------------------------------------------------------------------
# S(d)
# ---------------------------------------------------------------------------------------------


def test_strength_n3_by_hand():
    s = np.array([3.0, 2.0, 1.0])  # model 0 is best; every pair (i<j) has s_i > s_j
    losses = np.array([
        [1.0, 2.0, 3.0],  # (0,1) 1<2 ✓ (0,2) 1<3 ✓ (1,2) 2<3 ✓ -> 3/3
        [3.0, 2.0, 1.0],  # all reversed                       -> 0/3
        [1.0, 1.0, 2.0],  # (0,1) tie -> 0, (0,2) ✓, (1,2) ✓    -> 2/3
        [2.0, 1.0, 3.0],  # (0,1) 2<1 ✗, (0,2) ✓, (1,2) ✓       -> 2/3
        [1.0, np.nan, 3.0],  # NaN loss                        -> NaN
    ])
    got = predictive_strength(losses, s)
    np.testing.assert_allclose(got[:4], [1.0, 0.0, 2 / 3, 2 / 3])
    assert math.isnan(got[4])


def test_strength_score_ties_and_increasing_scores():
    # s_0 == s_1: pair (0,1) always counts 0, so S == 1 is unreachable.
    s = np.array([2.0, 2.0, 1.0])
    losses = np.array([
        [1.0, 2.0, 3.0],  # (0,2) 1<3 ✓, (1,2) 2<3 ✓ -> 2/3
        [3.0, 1.0, 2.0],  # (0,2) 3<2 ✗, (1,2) 1<2 ✓ -> 1/3
    ])
    np.testing.assert_allclose(predictive_strength(losses, s), [2 / 3, 1 / 3])
    # s_i < s_j branch: increasing scores with decreasing losses agree on every pair.
    np.testing.assert_allclose(predictive_strength(np.array([[3.0, 2.0, 1.0]]), np.array([1.0, 2.0, 3.0])), [1.0])


def test_strength_rejects_small_n_and_bad_shapes():
    with pytest.raises(ValueError, match="N >= 3"):
        predictive_strength(np.ones((4, 2)), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="models"):
        predictive_strength(np.ones((4, 3)), np.array([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="finite"):
        predictive_strength(np.ones((1, 3)), np.array([1.0, np.nan, 3.0]))


@settings(max_examples=60, deadline=None)
@given(
    losses=hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(3, 6)),
                      elements=st.floats(-1e6, 1e6, allow_nan=False)),
    data=st.data(),
)
def test_strength_in_unit_interval(losses, data):
    s = data.draw(hnp.arrays(np.float64, losses.shape[1], elements=st.floats(-1e3, 1e3, allow_nan=False)))
    got = predictive_strength(losses, s)
    assert got.shape == (losses.shape[0],)
    assert np.all(np.isfinite(got)) and np.all((got >= 0) & (got <= 1))


# ---------------------------------------------------------------------------------------------
# BPC, labels, normalisation
# ---------------------------------------------------------------------------------------------


def test_bits_per_char():
    # 100 nats over 50 chars = 2 nats/char = 2 / ln 2 bits/char = 2.8853900817779268
    assert bits_per_char(100.0, 50) == pytest.approx(2.8853900817779268)
    got = bits_per_char(np.array([math.log(2) * 10, 1.0]), np.array([5, 0]))  # 10 bits / 5 chars; 0 chars
    assert got[0] == pytest.approx(2.0) and math.isnan(got[1])


def test_choose_labels_tie_breaking():
    ids = np.array([5, 3, 9, 1, 7, 2])
    strength = np.array([1.0, 1.0, 0.0, 1 / 3, 0.0, np.nan])
    pos, neg = choose_labels(ids, strength)
    assert pos.tolist() == [3, 5]  # S == 1, id order
    assert neg.tolist() == [7, 9]  # two lowest S: both 0, tie broken by id
    pos, neg = choose_labels(ids, strength, n_positive=1)
    assert pos.tolist() == [3] and neg.tolist() == [7]
    # ask for more negatives than exist: 7, 9 (S=0), 1 (S=1/3); never 5 (S=1, capped out) nor 2 (NaN)
    pos, neg = choose_labels(ids, strength, n_positive=1, n_negative=10)
    assert neg.tolist() == [7, 9, 1]


def test_choose_labels_string_ids_and_duplicates():
    pos, neg = choose_labels(["b", "a", "c"], np.array([0.5, 0.5, 1.0]))
    assert pos.tolist() == ["c"] and neg.tolist() == ["a"]
    with pytest.raises(ValueError, match="unique"):
        choose_labels([1, 1], np.array([0.0, 1.0]))


def test_normalize_for_fasttext():
    assert normalize_for_fasttext("a\nb\r\nc\u2028d\x85e\tf") == "a b  c d e\tf"
    assert normalize_for_fasttext("no breaks") == "no breaks"


@given(st.lists(st.one_of(st.none(), st.text(alphabet=st.sampled_from("ab \t\n\r\v\f\x1c\x1d\x1e\x85"
                                                                      "\u2028\u2029é\u0000")))))
def test_column_normalisation_matches_the_per_string_one(texts):
    """The vectorised (Arrow regex) path of the stage equals str.splitlines' set of breaks."""
    got = normalize_column_for_fasttext(pa.array(texts, pa.string()))
    assert got == [None if t is None else normalize_for_fasttext(t) for t in texts]
    assert all(t is None or len(t.splitlines()) <= 1 for t in got)


# ---------------------------------------------------------------------------------------------
# Selection policies
# ---------------------------------------------------------------------------------------------


def test_select_threshold():
    assert select_threshold(np.array([0.2, 0.5, np.nan, 0.7]), 0.5).tolist() == [False, True, False, True]


def test_top_fraction_by_chars_hand_example():
    scores = np.array([0.9, 0.5, 0.8, np.nan, 0.5, 0.1])
    n_chars = np.array([10, 30, 20, 100, 5, 35])
    # total = 200 chars (NaN doc included), fraction 0.2 -> budget 40.
    # visit order (score desc, ties by input order): 0 (10), 2 (20), 1 (30), 4 (5), 5 (35)
    # chars kept before each:                        0,      10,     30,     60,    65
    # kept iff before < 40: docs 0, 2 and 1 (the one crossing the budget, 30 -> 60).
    # Had the 0.5 tie gone to doc 4 first, doc 4 (before 30) and doc 1 (before 35) would both be in.
    got = select_top_fraction_by_chars(scores, n_chars, 0.2)
    assert got.tolist() == [True, True, True, False, False, False]
    assert select_top_fraction_by_chars(scores, n_chars, 0.0).tolist() == [False] * 6
    assert select_top_fraction_by_chars(scores, n_chars, 1.0).tolist() == [True, True, True, False, True, True]


# ---------------------------------------------------------------------------------------------
# fastText scorer
# ---------------------------------------------------------------------------------------------


def _corpus(n: int = 400, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    good = [f"proof{i}" for i in range(20)]
    bad = [f"promo{i}" for i in range(20)]
    shared = [f"the{i}" for i in range(20)]
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        vocab = good if label else bad
        words = [rng.choice(vocab) if rng.random() < 0.5 else rng.choice(shared) for _ in range(12)]
        texts.append(" ".join(words[:6]) + "\n" + " ".join(words[6:]))  # multi-line on purpose
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts, labels = _corpus()
    out = tmp_path_factory.mktemp("ft") / "scorer.bin"
    # train_scorer in a fresh process: fastText 0.9.3 training is reproducible only as the first
    # training of a process (after torch or another training it can give NaN weights)
    report = train_isolated(texts, labels, str(out), epoch=20, lr=0.5, dim=16, bucket=20_000, seed=0)
    return report, texts


def test_train_scorer_heldout_quality(trained):
    report, _ = trained
    assert (report.n_train, report.n_valid) == (360, 40)
    assert report.precision > 0.9 and report.recall > 0.9


def test_score_texts_matches_predict(trained):
    report, texts = trained
    model = load_scorer(report.model_path)
    sample = texts[:20]
    got = score_texts(model, sample)
    assert got.shape == (20,) and np.all((got >= 0) & (got <= 1))
    for text, p in zip(sample, got, strict=True):
        labels, probs = model.predict([text.replace("\n", " ")], k=-1)
        expected = dict(zip(labels[0], probs[0], strict=True))["__label__1"]
        assert p == pytest.approx(min(float(expected), 1.0), abs=1e-6)
    assert score_texts(model, []).shape == (0,)


def test_load_scorer_file_and_memory_urls(trained, tmp_path):
    report, texts = trained
    reference = score_texts(load_scorer(report.model_path), texts[:10])

    from_file = load_scorer("file://" + report.model_path)
    np.testing.assert_array_equal(score_texts(from_file, texts[:10]), reference)

    mem = fsspec.filesystem("memory")
    with open(report.model_path, "rb") as f:
        mem.pipe("/preselect-test/scorer.bin", f.read())
    try:
        from_memory = load_scorer("memory://preselect-test/scorer.bin", cache_dir=tmp_path)
        np.testing.assert_array_equal(score_texts(from_memory, texts[:10]), reference)
        assert len(list(tmp_path.glob("*.bin"))) == 1  # cached copy, keyed by URL
    finally:
        mem.rm("/preselect-test", recursive=True)


class _FakeModel:
    def __init__(self, labels: list[str]) -> None:
        self.labels = labels

    def get_labels(self) -> list[str]:
        return self.labels

    def predict(self, texts, k):
        assert isinstance(texts, list) and k == -1
        # fastText orders labels by probability, so __label__1 may come first or second
        return ([["__label__0", "__label__1"], ["__label__1", "__label__0"]],
                [np.array([0.7, 0.3]), np.array([1.00001, 0.0])])


def test_score_texts_label_order_and_clipping():
    got = score_texts(_FakeModel(["__label__0", "__label__1"]), ["a", "b"])
    np.testing.assert_allclose(got, [0.3, 1.0])  # 1.00001 clipped to 1
    with pytest.raises(ValueError, match="labels"):
        score_texts(_FakeModel(["__label__pos", "__label__neg"]), ["a"])
