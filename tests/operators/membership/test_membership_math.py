"""Membership-inference scores against hand-computed values on tiny arrays."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from operators.membership.math import (
    FrequencyTable,
    dcpdd_alpha,
    dcpdd_score,
    lowercase_ratio,
    min_k_plus_plus,
    min_k_plus_plus_z,
    min_k_prob,
    perplexity,
    zlib_ratio,
)

LP = np.array([-1.0, -2.0, -0.5, -3.0], dtype=np.float32)  # mean = -6.5 / 4 = -1.625
LN2 = math.log(2.0)


def test_perplexity():
    assert perplexity(LP) == pytest.approx(math.exp(1.625))
    assert perplexity([0.0, 0.0]) == 1.0
    assert perplexity([-1000.0]) == math.inf  # exp(1000) overflows float64


@pytest.mark.parametrize(("k", "expected"), [
    (0.5, (-3.0 + -2.0) / 2),      # int(4 · 0.5) = 2 lowest: -3, -2
    (0.6, (-3.0 + -2.0) / 2),      # int(2.4) = 2
    (0.2, -3.0),                   # int(0.8) = 0 → at least 1
    (1.0, -1.625),                 # all four
])
def test_min_k_prob(k, expected):
    assert min_k_prob(LP, k=k) == pytest.approx(expected)


def test_min_k_prob_rejects_bad_k():
    with pytest.raises(ValueError):
        min_k_prob(LP, k=0.0)


def test_min_k_plus_plus_z_on_a_real_distribution():
    # p = [1/2, 1/4, 1/4]: μ = Σ p ln p = -1.5 ln2 (entropy 1.5 ln2),
    # E[(ln p)²] = ½ ln²2 + 2·¼·(2 ln2)² = 2.5 ln²2, σ² = 2.5 ln²2 - 2.25 ln²2 → σ = 0.5 ln2.
    # token 0: z = (-ln2 + 1.5 ln2) / (0.5 ln2) = 1; token 1: z = (-2 ln2 + 1.5 ln2) / (0.5 ln2) = -1
    z = min_k_plus_plus_z([-LN2, -2 * LN2], [1.5 * LN2] * 2, [2.5 * LN2**2] * 2)
    np.testing.assert_allclose(z, [1.0, -1.0], rtol=1e-12)


def test_min_k_plus_plus_with_sigma_clamp():
    entropy = [1.0, 0.5, 1.0, 2.0]
    logp2 = [2.0, 1.25, 5.0, 4.0]
    # μ = -H; σ² = logp2 - H²:  [1, 1, 4, 0 → clamped 1e-10 (σ = 1e-5)]
    # z = [(-1+1)/1, (-2+0.5)/1, (-0.5+1)/2, (-3+2)/1e-5] = [0, -1.5, 0.25, -1e5]
    np.testing.assert_allclose(min_k_plus_plus_z(LP, entropy, logp2), [0.0, -1.5, 0.25, -1e5], rtol=1e-9)
    assert min_k_plus_plus(LP, entropy, logp2, k=0.5) == pytest.approx((-1e5 + -1.5) / 2)
    assert min_k_plus_plus(LP[:3], entropy[:3], logp2[:3], k=0.67) == pytest.approx((-1.5 + 0.0) / 2)


def test_zlib_ratio():
    # zlib.compress(b"aaaa") = 2-byte header + 6-byte deflate block + 4-byte Adler-32 = 12 bytes
    assert zlib_ratio(LP, "aaaa") == pytest.approx(1.625 / 12)
    # the text is measured as UTF-8 bytes
    assert zlib_ratio(LP, "héllo") == pytest.approx(1.625 / len(zlib.compress("héllo".encode())))


def test_lowercase_ratio():
    assert lowercase_ratio(LP, [-1.0, -1.0, -1.0, -1.0]) == pytest.approx(1.625 / 1.0)
    assert lowercase_ratio(LP, [-2.0, -2.0]) == pytest.approx(1.625 / 2.0)
    assert math.isnan(lowercase_ratio(LP, [0.0, 0.0]))


def test_empty_inputs_are_nan():
    table = FrequencyTable.from_token_ids([[0, 1]], vocab_size=3, model="m")
    assert math.isnan(perplexity([]))
    assert math.isnan(min_k_prob([]))
    assert math.isnan(min_k_plus_plus([], [], []))
    assert math.isnan(zlib_ratio([], "abc"))
    assert math.isnan(lowercase_ratio([], [-1.0]))
    assert math.isnan(dcpdd_score([], [], table))


# ---------------------------------------------------------------------------- frequency table


def small_table() -> FrequencyTable:
    # first 3 tokens of each doc: [0, 1, 1] + [1, 3] → counts [1, 3, 0, 1, 0], N = 5
    return FrequencyTable.from_token_ids([np.array([0, 1, 1, 2]), np.array([1, 3])], vocab_size=5,
                                         model="tiny", max_tokens_per_doc=3)


def test_frequency_table_counts_and_laplace_freq():
    t = small_table()
    np.testing.assert_array_equal(t.counts, [1, 3, 0, 1, 0])
    assert (t.n_tokens, t.vocab_size, t.model, t.max_tokens_per_doc) == (5, 5, "tiny", 3)
    # (count + 1) / (N + |V|) = (c + 1) / 10
    np.testing.assert_allclose(t.freq([0, 1, 2, 3, 4]), [0.2, 0.4, 0.1, 0.2, 0.1])


def test_frequency_table_validation():
    with pytest.raises(ValueError):
        FrequencyTable.from_token_ids([[0, 5]], vocab_size=5, model="m")
    with pytest.raises(ValueError):
        FrequencyTable(np.array([1, 2]), n_tokens=4, vocab_size=2, model="m")
    with pytest.raises(ValueError):
        small_table().freq([7])


def test_frequency_table_merge():
    a = small_table()
    b = FrequencyTable.from_token_ids([[4, 4]], vocab_size=5, model="tiny", max_tokens_per_doc=3)
    m = a.merge(b)
    np.testing.assert_array_equal(m.counts, [1, 3, 0, 1, 2])
    assert m.n_tokens == 7
    with pytest.raises(ValueError):
        a.merge(FrequencyTable.from_token_ids([[4]], vocab_size=5, model="other", max_tokens_per_doc=3))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_frequency_table_round_trip(tmp_path, where):
    path = str(tmp_path / "freq.parquet") if where == "local" else f"memory://{tmp_path.name}/freq.parquet"
    t = small_table()
    t.save(path)
    back = FrequencyTable.load(path)
    np.testing.assert_array_equal(back.counts, t.counts)
    assert (back.n_tokens, back.vocab_size, back.model, back.max_tokens_per_doc) == (5, 5, "tiny", 3)
    if where == "local":
        f = pq.read_table(path)
        assert f.column_names == ["token_id", "count"]
        assert f.schema.metadata[b"model"] == b'"tiny"'


# ---------------------------------------------------------------------------- DC-PDD


def test_dcpdd_first_occurrence_and_cap():
    t = small_table()  # f = [0.2, 0.4, 0.1, 0.2, 0.1]
    ids = [1, 2, 1, 3]
    lp = np.log([0.5, 0.9, 0.1, 0.5])
    # α = min(-p ln f, a) at the first occurrences (positions 0, 1, 3; position 2 repeats token 1):
    #   pos 0: -0.5 ln 0.4 = 0.458;  pos 1: -0.9 ln 0.1 = 2.07 → capped at a = 1;  pos 3: -0.5 ln 0.2 = 0.805
    expected = (-0.5 * math.log(0.4) + 1.0 + -0.5 * math.log(0.2)) / 3
    assert dcpdd_score(ids, lp, t, a=1.0) == pytest.approx(expected)
    # if the repeat counted, the mean would include -0.1 ln 0.4 = 0.0916 over 4 positions
    assert dcpdd_score(ids, lp, t, a=1.0) != pytest.approx((expected * 3 - 0.1 * math.log(0.4)) / 4)
    # default a = 0.01: every α above is capped
    assert dcpdd_score(ids, lp, t) == pytest.approx(0.01)


def test_dcpdd_below_cap():
    t = small_table()
    # p = 0.001, f(1) = 0.4: α = -0.001 ln 0.4 = 0.000916 < 0.01; f(4) = 0.1: α = -0.001 ln 0.1 = 0.0023
    assert dcpdd_score([1, 4], np.log([0.001, 0.001]), t) == pytest.approx(
        (-0.001 * math.log(0.4) + -0.001 * math.log(0.1)) / 2)
    np.testing.assert_allclose(dcpdd_alpha([0.0], [0.5], a=10.0), [math.log(2.0)])


def test_dcpdd_rejects_misaligned():
    with pytest.raises(ValueError):
        dcpdd_score([1, 2], [-1.0], small_table())


# ---------------------------------------------------------------------------- properties

lp_arrays = hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(-50, 0, width=32))


@settings(max_examples=60, deadline=None)
@given(lp=lp_arrays, data=st.data(), a=st.floats(1e-4, 1.0))
def test_dcpdd_in_range(lp, data, a):
    ids = data.draw(hnp.arrays(np.int64, lp.shape, elements=st.integers(0, 4)))
    beta = dcpdd_score(ids, lp, small_table(), a=a)
    assert 0.0 <= beta <= a


@settings(max_examples=60, deadline=None)
@given(lp=lp_arrays, data=st.data(), k=st.floats(0.01, 1.0), text=st.text(max_size=50))
def test_scores_are_finite(lp, data, k, text):
    n = lp.shape
    entropy = data.draw(hnp.arrays(np.float32, n, elements=st.floats(0, 15, width=32)))
    logp2 = data.draw(hnp.arrays(np.float32, n, elements=st.floats(0, 500, width=32)))
    lower = data.draw(hnp.arrays(np.float32, n, elements=st.floats(-50, -0.25, width=32)))
    for value in (perplexity(lp), min_k_prob(lp, k), min_k_plus_plus(lp, entropy, logp2, k),
                  zlib_ratio(lp, text), lowercase_ratio(lp, lower)):
        assert math.isfinite(value)
