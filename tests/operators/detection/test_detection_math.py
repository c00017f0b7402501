"""Zero-shot detection scores against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from operators.detection.math import (
    binoculars_score,
    cross_entropy_per_position,
    integer_rank,
    mean_entropy,
    mean_log_rank,
)

LN2, LN3 = math.log(2.0), math.log(3.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mean_entropy():
    assert mean_entropy([1.0, 2.0, 3.5]) == pytest.approx(6.5 / 3)
    assert math.isnan(mean_entropy([]))


def test_mean_log_rank():
    # V = 10: rank · V = [1, 5, 0.4, 10] → r = [1, 5, max(1, 0) = 1, 10]
    rank = np.array([0.1, 0.5, 0.04, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(integer_rank(rank, 10), [1, 5, 1, 10])
    assert mean_log_rank(rank, 10) == pytest.approx((0.0 + math.log(5) + 0.0 + math.log(10)) / 4)
    assert math.isnan(mean_log_rank([], 10))


# two positions, vocab 3
OBSERVER = torch.tensor([[0.0, 0.0, 0.0],          # p = [1/3, 1/3, 1/3]
                         [LN3, 0.0, 0.0]])         # p = [3/5, 1/5, 1/5]
PERFORMER = torch.tensor([[LN2, 0.0, 0.0],         # q = [1/2, 1/4, 1/4]
                          [0.0, 0.0, 0.0]])        # q = [1/3, 1/3, 1/3]
# x_0 = -(1/3 ln 1/2 + 1/3 ln 1/4 + 1/3 ln 1/4) = 5/3 ln 2;  x_1 = -(3/5 + 1/5 + 1/5) ln 1/3 = ln 3
X_HAND = [-(math.log(0.5) + math.log(0.25) + math.log(0.25)) / 3, -math.log(1 / 3)]


def test_cross_entropy_by_hand():
    x = cross_entropy_per_position(OBSERVER, PERFORMER)
    assert x.dtype == torch.float32 and x.shape == (2,)
    np.testing.assert_allclose(x.numpy(), X_HAND, rtol=1e-6)
    np.testing.assert_allclose(X_HAND, [5 / 3 * LN2, LN3])


def test_binoculars_by_hand():
    # two tokens; position 0 predicts token 1 = id 0: performer lp = ln 1/2. The cross-perplexity
    # averages both positions, the last one (predicting past the text) included, as metrics.py does.
    lp = [math.log(0.5)]
    x = cross_entropy_per_position(OBSERVER, PERFORMER).numpy()
    expected = LN2 / ((5 / 3 * LN2 + LN3) / 2)
    assert binoculars_score(lp, x) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(binoculars_score([], []))
    with pytest.raises(ValueError, match="one value more"):
        binoculars_score([-1.0], [1.0])


def test_cross_entropy_masked_vocab_is_not_nan():
    # observer p = [1/2, 0, 1/2]; performer log q = [-ln 2, -inf, -ln 2] → x = ln 2 (0 · -inf counts as 0)
    obs = torch.tensor([[0.0, -math.inf, 0.0]])
    perf = torch.tensor([[0.0, -math.inf, 0.0]])
    assert cross_entropy_per_position(obs, perf).item() == pytest.approx(LN2)


def test_cross_entropy_chunks_batches_and_dtypes():
    g = torch.Generator().manual_seed(0)
    obs, perf = torch.randn(2, 7, 11, generator=g), torch.randn(2, 7, 11, generator=g)
    full = cross_entropy_per_position(obs, perf, chunk_size=1000)
    assert full.shape == (2, 7)
    torch.testing.assert_close(cross_entropy_per_position(obs, perf, chunk_size=3), full)
    torch.testing.assert_close(cross_entropy_per_position(obs[1], perf[1], chunk_size=1), full[1])
    half = cross_entropy_per_position(obs.bfloat16(), perf.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError):
        cross_entropy_per_position(obs, perf[:, :3])


@settings(max_examples=50, deadline=None)
@given(logits=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.just(2), st.integers(2, 9)),
                         elements=st.floats(-30, 30, width=32)),
       chunk=st.integers(1, 7))
def test_cross_entropy_is_finite_and_above_entropy(logits, chunk):
    obs, perf = torch.from_numpy(logits[:, 0]), torch.from_numpy(logits[:, 1])
    x = cross_entropy_per_position(obs, perf, chunk_size=chunk)
    p = torch.softmax(obs.double(), -1)
    entropy = -(p * torch.log_softmax(obs.double(), -1)).sum(-1)
    assert torch.isfinite(x).all()
    assert (x.double() >= entropy - 1e-3).all()  # Gibbs: H(p, q) ≥ H(p)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_scores_are_finite(data, n):
    floats = st.floats(0.0, 12.0, width=32)
    entropy = data.draw(hnp.arrays(np.float32, n, elements=floats))
    rank = data.draw(hnp.arrays(np.float32, n, elements=st.floats(2.0**-20, 1.0, width=32)))
    lp = data.draw(hnp.arrays(np.float32, n, elements=st.floats(-30.0, 0.0, width=32)))
    x = data.draw(hnp.arrays(np.float32, n + 1, elements=st.floats(0.125, 12.0, width=32)))
    for value in (mean_entropy(entropy), mean_log_rank(rank, 50_000), binoculars_score(lp, x)):
        assert math.isfinite(value)


def test_registered_directions_follow_the_reference_code():
    """DetectGPT's run.py scores its entropy baseline as is (machine-written = 1) and negates only the
    rank baselines: higher mean entropy ⇒ machine, lower mean log-rank ⇒ machine."""
    from operators.scores import score_direction

    assert score_direction("m__mean_entropy") == "higher"
    assert score_direction("m__mean_entropy_topk") == "higher"
    assert score_direction("m__mean_log_rank") == "lower"
