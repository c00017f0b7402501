"""Per-position LM metrics against hand-computed values and a naive full-softmax reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from operators.lm.metrics import (
    EXACT_METRICS,
    chunk_rows,
    chunks,
    cross_entropy,
    nll_sum,
    token_metrics,
    topk_metrics,
)

LN2 = math.log(2)

# Two positions, vocabulary of 4.
# Position 0: logits (3, 2, 1, 1)·ln2 -> p = (8, 4, 2, 2)/16 = (.5, .25, .125, .125); target 1 (p = .25)
#   logprob     = ln .25                                   = -2 ln2
#   entropy     = .5·ln2 + .25·2ln2 + 2·.125·3ln2          = 1.75 ln2
#   max_logprob = ln .5                                    = -ln2
#   rank        = |{.5, .25}| / 4                          = .5
#   top_p       = .5 + .25                                 = .75
#   logp2       = .5·ln2² + .25·(2ln2)² + .25·(3ln2)²      = 3.75 ln2²
# Position 1: logits (0, 0, 0, 0) -> p = .25 each; target 3
#   logprob = max_logprob = -ln4, entropy = ln4, rank = 4/4 (ties count), top_p = 1, logp2 = ln4²
HAND_LOGITS = torch.tensor([[3.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]) * torch.tensor([[LN2], [1.0]])
HAND_TARGETS = torch.tensor([1, 3])
HAND_EXPECTED = {
    "logprob": [-2 * LN2, -2 * LN2],
    "entropy": [1.75 * LN2, 2 * LN2],
    "max_logprob": [-LN2, -2 * LN2],
    "rank": [0.5, 1.0],
    "top_p": [0.75, 1.0],
    "logp2": [3.75 * LN2**2, (2 * LN2) ** 2],
}


def naive(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The definitions, written the obvious way in float64 over the full vocabulary."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    p = lp.exp()
    lt = lp.gather(-1, targets[:, None])
    at_least = lp >= lt
    return {"logprob": lt[:, 0], "entropy": -(p * lp).sum(-1), "max_logprob": lp.max(-1).values,
            "rank": at_least.double().mean(-1), "top_p": (p * at_least).sum(-1), "logp2": (p * lp**2).sum(-1)}


def test_hand_computed_two_positions():
    got = token_metrics(HAND_LOGITS.clone(), HAND_TARGETS)
    assert list(got) == list(EXACT_METRICS)
    for name, want in HAND_EXPECTED.items():
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_only_requested_metrics_and_logprob_always():
    got = token_metrics(HAND_LOGITS.clone(), HAND_TARGETS, ("rank",))
    assert set(got) == {"logprob", "rank"}
    np.testing.assert_allclose(got["rank"].numpy(), [0.5, 1.0])
    with pytest.raises(ValueError, match="unknown metrics"):
        token_metrics(HAND_LOGITS.clone(), HAND_TARGETS, ("perplexity",))


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_matches_naive_reference_on_random_logits(scale):
    torch.manual_seed(int(scale * 10))
    logits = torch.randn(64, 1000) * scale
    targets = torch.randint(0, 1000, (64,))
    want, got = naive(logits, targets), token_metrics(logits.clone(), targets)
    for name in EXACT_METRICS:
        np.testing.assert_allclose(got[name].double().numpy(), want[name].numpy(), rtol=2e-5, atol=2e-5,
                                   err_msg=name)


def test_bfloat16_logits_are_upcast_and_left_untouched():
    torch.manual_seed(1)
    logits = (torch.randn(8, 300) * 4).bfloat16()
    before = logits.clone()
    got = token_metrics(logits, torch.arange(8))
    want = naive(before.float(), torch.arange(8))
    assert torch.equal(logits, before)
    np.testing.assert_allclose(got["entropy"].numpy(), want["entropy"].numpy(), rtol=1e-5, atol=1e-5)


def test_chunked_equals_whole_with_reused_scratch():
    torch.manual_seed(2)
    logits, targets = torch.randn(50, 777) * 5, torch.randint(0, 777, (50,))
    whole = token_metrics(logits.clone(), targets)
    scratch = (torch.empty(8, 777), torch.empty(8, 777))
    parts: dict[str, list] = {}
    for rows in chunks(50, 8):
        for k, v in token_metrics(logits[rows].clone(), targets[rows], EXACT_METRICS, scratch).items():
            parts.setdefault(k, []).append(v)
    for name in EXACT_METRICS:
        torch.testing.assert_close(torch.cat(parts[name]), whole[name], rtol=0, atol=1e-6)
    assert [(s.start, s.stop) for s in chunks(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert chunk_rows(49152, budget_elems=49152 * 16) == 16 and chunk_rows(10**9) == 1


def test_minus_infinity_logits_give_finite_metrics():
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    got = token_metrics(logits, torch.tensor([0]))
    np.testing.assert_allclose(got["entropy"].numpy(), [LN2], rtol=1e-6)
    np.testing.assert_allclose(got["logp2"].numpy(), [LN2**2], rtol=1e-6)
    np.testing.assert_allclose(got["rank"].numpy(), [0.5])


def test_cross_entropy_by_hand():
    # observer p = (.5, .25, .125, .125), performer uniform: -Σ p ln .25 = ln4
    # observer uniform, performer q = (.5, .25, .125, .125): -.25·(ln.5 + ln.25 + 2 ln.125) = 2.25 ln2
    p_logits, uniform = HAND_LOGITS[:1], torch.zeros(1, 4)
    np.testing.assert_allclose(cross_entropy(p_logits, uniform).numpy(), [2 * LN2], rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(uniform, p_logits).numpy(), [2.25 * LN2], rtol=1e-6)
    # against itself it is the entropy
    torch.manual_seed(3)
    z = torch.randn(5, 100) * 3
    torch.testing.assert_close(cross_entropy(z, z), naive(z, torch.zeros(5, dtype=torch.long))["entropy"].float())


def test_topk_estimates_by_hand():
    # p = (.5, .25, .125, .125), k = 2: top = (ln .5, ln .25), tail r = .25 over V - k = 2 tokens.
    # observed token 2: logprob ln .125, rank 4 (all four have p ≥ .125)
    #   top_p_topk   = .75 + (4 - 2)·.125 = 1.0 (the lower bound is exact here)
    #   entropy_topk = .5 ln2 + .25·2ln2 + .25·mid(2ln2 packed at p_(2)=.25, 3ln2 uniform) = 1.625 ln2
    #   logp2_topk   = .5 ln2² + .25·4ln2² + .25·mid(4ln2², 9ln2²)                       = 3.125 ln2²
    top = np.log([[0.5, 0.25]])
    got = topk_metrics(np.log([0.125]), np.array([4]), top, vocab_size=4)
    np.testing.assert_allclose(got["top_p_topk"], [1.0], rtol=1e-6)
    np.testing.assert_allclose(got["entropy_topk"], [1.625 * LN2], rtol=1e-6)
    np.testing.assert_allclose(got["logp2_topk"], [3.125 * LN2**2], rtol=1e-6)
    np.testing.assert_allclose(got["rank"], [1.0])
    np.testing.assert_allclose(got["max_logprob"], [-LN2], rtol=1e-6)
    # observed token 1 is inside the top-k: top_p is exact (.5 + .25)
    inside = topk_metrics(np.log([0.25]), np.array([2]), top, vocab_size=4)
    np.testing.assert_allclose(inside["top_p_topk"], [0.75], rtol=1e-6)
    np.testing.assert_allclose(inside["rank"], [0.5])


def test_topk_estimates_bracket_the_truth_on_random_distributions():
    torch.manual_seed(4)
    logits = torch.randn(200, 2000) * 2.5
    targets = torch.randint(0, 2000, (200,))
    exact = naive(logits, targets)
    lp = torch.log_softmax(logits.double(), -1)
    top = lp.topk(20).values.numpy()
    rank = (lp >= lp.gather(-1, targets[:, None])).sum(-1).numpy()
    est = topk_metrics(exact["logprob"].numpy(), rank, top, 2000)
    np.testing.assert_allclose(est["rank"], exact["rank"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(est["max_logprob"], exact["max_logprob"].numpy(), rtol=1e-6)
    assert np.all(est["top_p_topk"] <= exact["top_p"].numpy() + 1e-6)  # a lower bound
    rel = np.abs(est["entropy_topk"] - exact["entropy"].numpy()) / exact["entropy"].numpy()
    assert rel.mean() < 0.15


def test_nll_sum():
    assert nll_sum(np.array([-1.5, -0.25], dtype=np.float32)) == pytest.approx(1.75)
    assert nll_sum(np.array([], dtype=np.float32)) == 0.0
