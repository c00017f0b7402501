"""DC-PDD reference data: the frequency table's tokenizer is checked before Ray starts, and the demo
reference is disjoint from the documents the nightly pipeline scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.demo.corpus import prepare_demo_corpus, reference_docs
from operators.lm.models import ModelSpec, load_tokenizer, tokenizer_fingerprint
from operators.membership.math import FrequencyTable
from pipelines.config import ConfigError, parse_config
from tests.operators.lm.tiny_lm import build_tiny_lm


def _config(model: Path, freq: Path) -> dict:
    return {"name": "t", "input": {"url": "/tmp/in"}, "stages": [
        {"op": "lm", "model": {"name": "tiny", "path": str(model)}, "max_tokens": 64},
        {"op": "scores", "model": "tiny", "dcpdd": {"freq_table": str(freq)}}]}


def test_a_table_from_another_tokenizer_is_a_config_error_naming_both_fingerprints(tmp_path):
    model = build_tiny_lm(tmp_path / "lm")
    ours = tokenizer_fingerprint(load_tokenizer(ModelSpec(name="tiny", path=str(model))))
    good, other, old = tmp_path / "good.parquet", tmp_path / "other.parquet", tmp_path / "old.parquet"
    counts = np.ones(32, dtype=np.int64)
    FrequencyTable(counts, 32, 32, "tiny", 64, ours).save(str(good))
    FrequencyTable(counts, 32, 32, "tiny", 64, "0123456789abcdef").save(str(other))
    FrequencyTable(counts, 32, 32, "tiny", 64).save(str(old))  # made before fingerprints existed
    assert FrequencyTable.load(str(good)).tokenizer_fingerprint == ours
    parse_config(_config(model, good))
    parse_config(_config(model, old))  # cannot be checked: a warning, not an error
    with pytest.raises(ConfigError) as err:
        parse_config(_config(model, other))
    message = str(err.value)
    assert "stages.1.scores.dcpdd.freq_table" in message and str(other) in message
    assert "0123456789abcdef" in message and ours in message


def test_demo_reference_is_disjoint_from_the_scored_corpus(demo_freq_table):
    meta = FrequencyTable.read_metadata(str(demo_freq_table))
    corpus = prepare_demo_corpus(log=lambda _msg: None)
    scored = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()
    reference = reference_docs()
    # docstrings a process has imported differ slightly (the table was counted in another process)
    assert meta["source"]["documents"] > 500 and len(reference) > 500
    joined = "\n\x00".join(scored)
    assert not [r for r in reference if r in joined]  # no reference doc inside a scored one
    demo_model = Path(corpus).parent / "smollm2-135m-instruct"
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(
        load_tokenizer(ModelSpec(name="smollm2", path=str(demo_model))))


def test_reference_counts_bos_and_uses_the_models_vocabulary_width(tmp_path):
    """As DC-PDD's src/com_fre_dis.py: tok.encode(text)[:max_tok] (BOS included where the tokenizer
    adds one) into |V| = config.vocab_size bins (32 logits here, the tokenizer has 19 ids)."""
    import pyarrow as pa

    from jobs.train.freq import BatchCounter

    model = build_tiny_lm(tmp_path / "lm", bos=True)
    counter = BatchCounter(str(model), 3, "text")
    assert counter.vocab_size == 32
    out = counter(pa.table({"text": ["the cat", "the dog .", "   "]}))
    # ids: [<s>=1, the=3, cat=5], [1, 3, dog=6] (cut at 3, BOS included)
    got = dict(zip(out["token_id"][0].as_py(), out["count"][0].as_py(), strict=True))
    assert got == {1: 2, 3: 2, 5: 1, 6: 1} and out["tokens"][0].as_py() == 6
    table = FrequencyTable(np.bincount(list(got), weights=list(got.values()), minlength=32).astype(np.int64),
                           6, counter.vocab_size, "tiny")
    assert table.freq([1])[0] == pytest.approx((2 + 1) / (6 + 32))  # f = (count + 1) / (N + |V|)
