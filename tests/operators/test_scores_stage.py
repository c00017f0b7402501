"""The ``scores`` stage: LM columns -> score columns, against hand-computed values; config errors."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pyarrow as pa
import pytest

from operators.arrow import ragged
from operators.membership.lowercase import LowercaseTextConfig
from operators.membership.math import FrequencyTable
from operators.scores import ScoresConfig, infer_vocab_size
from pipelines.config import ConfigError, parse_config

V = 8
LIST = pa.list_(pa.float32())


def lm_batch(**extra: list) -> pa.Table:
    """Two scored docs, one skipped (null lists), one with no scored position (empty lists).

    Doc 0: x = [BOS=0, 3, 5, 3], lp = ln[.5, .25, .5], H = [1, 2, 1], E[ln²p] = [2, 5, 2],
    rank = [1, 2, 1]/V. Doc 1: x = [0, 7], lp = [ln .125], H = [0.5], E[ln²p] = [1], rank 4/V.
    """
    ln = math.log
    cols = {
        "text": ["abab", "hello", "   ", "x"],
        "m__token_ids": pa.array([[0, 3, 5, 3], [0, 7], None, [0]], pa.list_(pa.int32())),
        "m__logprob": pa.array([[ln(.5), ln(.25), ln(.5)], [ln(.125)], None, []], LIST),
        "m__entropy": pa.array([[1, 2, 1], [0.5], None, []], LIST),
        "m__logp2": pa.array([[2, 5, 2], [1], None, []], LIST),
        "m__rank": pa.array([[1 / V, 2 / V, 1 / V], [4 / V], None, []], LIST),
        "m__truncated": pa.array([False, False, None, False]),
    }
    cols.update(extra)
    return pa.table(cols)


def run(batch: pa.Table, **cfg) -> dict[str, list]:
    op = ScoresConfig(model="m", **cfg).build()
    out = op.process(batch)
    assert out.schema == op.output_schema() and out.num_rows == batch.num_rows
    return out.to_pydict()


def test_scores_by_hand():
    out = run(lm_batch(), min_k=0.34)
    ln = math.log
    # doc 0: mean lp = ln(.5·.25·.5)/3 = ln(1/16)/3
    assert out["m__ppl"][0] == pytest.approx(16 ** (1 / 3))
    assert out["m__ppl"][1] == pytest.approx(8.0)
    # Min-K% (k = .34, n = 3 -> 1 token): the lowest lp, ln .25
    assert out["m__mink"][:2] == pytest.approx([ln(.25), ln(.125)])
    # Min-K%++ z = (lp + H)/sqrt(E[ln²p] - H²): token 1: (ln .25 + 2)/1; doc 1: (ln .125 + .5)/sqrt(.75)
    z0 = [(ln(.5) + 1) / 1, (ln(.25) + 2) / 1, (ln(.5) + 1) / 1]
    assert out["m__minkpp"][0] == pytest.approx(min(z0))
    assert out["m__minkpp"][1] == pytest.approx((ln(.125) + .5) / math.sqrt(.75))
    assert out["m__zlib"][0] == pytest.approx(ln(16) / 3 / len(zlib.compress(b"abab")))
    assert out["m__mean_entropy"][:2] == pytest.approx([4 / 3, 0.5])
    # ranks 1, 2, 1 -> mean ln r = ln(2)/3; V inferred from the smallest rank fraction 1/8
    assert out["m__mean_log_rank"][:2] == pytest.approx([ln(2) / 3, ln(4)])
    for name, values in out.items():
        assert values[2:] == [None, None], name  # skipped and no scored position -> null


def test_dcpdd_scores_the_ids_after_bos(tmp_path, monkeypatch):
    loads = []
    real_load = FrequencyTable.load
    monkeypatch.setattr(FrequencyTable, "load", staticmethod(lambda path: loads.append(path) or real_load(path)))
    # reference counts for ids 0..7; N = 12, |V| = 8 -> f(x) = (count + 1) / 20
    counts = [0, 0, 0, 3, 0, 1, 0, 8]
    path = str(tmp_path / "freq.parquet")
    FrequencyTable(np.array(counts), 12, V, "m").save(path)
    out = run(lm_batch(), dcpdd={"freq_table": path, "a": 10.0}, zlib=False)
    # doc 0 scored ids 3, 5, 3: first occurrences 3 (p=.5, f=4/20) and 5 (p=.25, f=2/20)
    alpha = [-.5 * math.log(4 / 20), -.25 * math.log(2 / 20)]
    assert out["m__dcpdd"][0] == pytest.approx(np.mean(alpha))
    assert out["m__dcpdd"][1] == pytest.approx(-.125 * math.log(9 / 20))
    capped = run(lm_batch(), dcpdd={"freq_table": path, "a": 0.5}, zlib=False)
    assert capped["m__dcpdd"][0] == pytest.approx(np.mean([min(a, .5) for a in alpha]))
    assert "m__zlib" not in capped
    assert loads == [path, path]  # one load per built operator (per actor), none per batch


def test_binoculars_and_lowercase_columns():
    ln = math.log
    batch = lm_batch(m__xent=pa.array([[1, 1, 2, 4], [3, 1], None, []], LIST),
                     low__logprob=pa.array([[ln(.5), ln(.5), ln(.5)], [ln(.5)], None, None], LIST))
    out = run(batch, binoculars=True, lowercase={"enabled": True, "model": "low"})
    # xent: one row more than logprob (every position, the last one included)
    assert out["m__binoculars"][:2] == pytest.approx([(ln(16) / 3) / (8 / 4), ln(8) / 2])
    assert out["m__lowercase"][:2] == pytest.approx([(ln(16) / 3) / ln(2), ln(8) / ln(2)])
    assert out["m__binoculars"][2:] == [None, None]


def test_topk_estimates_are_never_silent():
    """Only estimates: an error without allow_topk_estimates; with it the same formulas, under their
    own names (M__minkpp_topk, M__mean_entropy_topk), never as M__minkpp."""
    exact = lm_batch()
    renamed = exact.rename_columns([{"m__entropy": "m__entropy_topk", "m__logp2": "m__logp2_topk"}.get(c, c)
                                    for c in exact.column_names])
    with pytest.raises(KeyError, match="allow_topk_estimates"):
        run(renamed)
    est, ref = run(renamed, allow_topk_estimates=True), run(exact)
    assert "m__minkpp" not in est and "m__mean_entropy" not in est
    assert est["m__minkpp_topk"] == ref["m__minkpp"] and est["m__mean_entropy_topk"] == ref["m__mean_entropy"]
    assert {k: v for k, v in est.items() if not k.endswith("_topk")} == \
        {k: v for k, v in ref.items() if k not in ("m__minkpp", "m__mean_entropy")}
    cfg = ScoresConfig(model="m")
    assert all("m__logp2_topk" not in need.columns for need in cfg.requires())
    assert "m__minkpp_topk" in ScoresConfig(model="m", allow_topk_estimates=True).provides()


def test_missing_columns_are_named():
    with pytest.raises(KeyError, match="m__xent.*observer"):
        run(lm_batch(), binoculars=True)
    with pytest.raises(KeyError, match="m__logp2"):
        run(lm_batch().drop_columns(["m__logp2"]))


def test_misaligned_lists_fail():
    bad = lm_batch().set_column(3, "m__entropy", pa.array([[1, 2], [0.5], None, []], LIST))
    with pytest.raises(ValueError, match="m__entropy and m__logprob differ"):
        run(bad)


def test_vocab_size_inference():
    assert infer_vocab_size([np.array([1, 3, 2]) / 50, None]) == 50
    assert infer_vocab_size([None, np.array([])]) is None
    with pytest.raises(ValueError, match="vocab_size"):  # smallest is 2/V: V/2 leaves half-integers
        infer_vocab_size([np.array([2, 3]) / 50])
    out = run(lm_batch(), vocab_size=16)  # explicit V: ranks 2, 4, 2 / 16
    assert out["m__mean_log_rank"][0] == pytest.approx((2 * math.log(2) + math.log(4)) / 3)
    with pytest.raises(ValueError, match="multiples of 1/5"):
        run(lm_batch(), vocab_size=5)


def test_ragged_handles_slices_and_nulls():
    arr = pa.array([[1.0], None, [2.0, 3.0], []], LIST).slice(1)
    rows = ragged(arr)
    assert rows[0] is None and rows[1].tolist() == [2.0, 3.0] and rows[2].tolist() == []


def test_lowercase_text_stage():
    op = LowercaseTextConfig().build()
    out = op.process(pa.table({"text": ["Hello ÉCOLE", "ABC"]}))
    assert out.column("text_lower").to_pylist() == ["hello école", "abc"]


def _pipeline(stage: dict) -> dict:
    """A scores-only pipeline whose input already carries the lm columns of model ``m``."""
    lm_columns = [f"m__{c}" for c in ("token_ids", "logprob", "entropy", "logp2", "rank", "n_scored", "truncated")]
    return {"name": "t", "input": {"url": "/tmp/in", "columns": lm_columns}, "stages": [stage]}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.0\.scores\.dcpdd\.freq_table.*curate freq build"):
        parse_config(_pipeline({"op": "scores", "model": "m", "dcpdd": {"freq_table": str(tmp_path / "no")}}))
    with pytest.raises(ConfigError, match="lowercase.model is required"):
        parse_config(_pipeline({"op": "scores", "model": "m", "lowercase": {"enabled": True}}))
    with pytest.raises(ConfigError, match="min_k"):
        parse_config(_pipeline({"op": "scores", "model": "m", "min_k": 0}))
    with pytest.raises(ConfigError, match="CPU"):
        parse_config(_pipeline({"op": "scores", "model": "m", "resources": {"num_gpus": 1}}))
    cfg = parse_config(_pipeline({"op": "scores", "model": "m"}))
    assert cfg.stages[0].stage_name == "scores_m"


def test_zlib_compresses_the_scored_span_of_the_lm_stages_text_column(tmp_path, one_torch_thread):
    """A cut document: zlib compresses the text of the tokens the lm stage kept, read from the lm
    stage's ``text_column``, never the whole ``text``."""
    from operators.lm.stage import LMStageConfig
    from tests.operators.lm.tiny_lm import build_tiny_lm

    model = build_tiny_lm(tmp_path / "lm")  # word-level tokenizer, no BOS: 6 tokens = 6 words
    lm = LMStageConfig(model={"name": "tiny", "path": str(model)}, max_tokens=6, text_column="text_lower")
    docs = pa.table({"text": ["THE CAT SAT ON THE MAT . A DOG", "HELLO WORLD"],
                     "text_lower": ["the cat sat on the mat . a dog", "hello world"]})
    batch, cols = docs, lm.build().process(docs)
    for name, column in zip(cols.column_names, cols.columns, strict=True):
        batch = batch.append_column(name, column)
    assert batch.column("tiny__truncated").to_pylist() == [True, False]
    scores = ScoresConfig(model="tiny", vocab_size=32).bind([lm])
    out = scores.build().process(batch).to_pydict()
    lp = [np.asarray(x, dtype=np.float64) for x in batch.column("tiny__logprob").to_pylist()]
    assert out["tiny__zlib"] == pytest.approx([-lp[0].mean() / len(zlib.compress(b"the cat sat on the mat")),
                                               -lp[1].mean() / len(zlib.compress(b"hello world"))], rel=1e-12)
    with pytest.raises(ValueError, match="row 0.*bind"):  # no lm stage: a cut row has no known span
        ScoresConfig(model="tiny", vocab_size=32).build().process(batch)


def test_gltr_rank_buckets_by_hand():
    """GLTR bins per document: ranks ≤ 10, 11–100, 101–1000, > 1000 (V = 2000, ranks as fractions c/V)."""
    ranks = [1, 5, 10, 11, 100, 101, 1000, 1001, 2000]
    n = len(ranks)
    batch = lm_batch(m__logprob=pa.array([[-1.0] * n, [-1.0], None, []], LIST),
                     m__entropy=pa.array([[1.0] * n, [1.0], None, []], LIST),
                     m__logp2=pa.array([[2.0] * n, [2.0], None, []], LIST),
                     m__rank=pa.array([[r / 2000 for r in ranks], [1 / 2000], None, []], LIST))
    out = run(batch, gltr=True, zlib=False, vocab_size=2000)
    got = [out[f"m__gltr_{b}"][0] for b in ("top10", "top100", "top1000", "rest")]
    assert got == pytest.approx([3 / 9, 2 / 9, 2 / 9, 2 / 9])
    assert [out[f"m__gltr_{b}"][1] for b in ("top10", "top100", "top1000", "rest")] == [1.0, 0.0, 0.0, 0.0]
    assert out["m__gltr_top10"][2:] == [None, None]
    assert "m__gltr_top10" not in run(lm_batch(), zlib=False)  # opt-in
