"""Token counts checked by hand, byte-fallback characters, and premiums."""

from __future__ import annotations

import math

import polars as pl
import pytest

from operators.token_premium import TokenCounter, premium, premium_table
from operators.tokenizers import TiktokenCounter, TokenizerSpec, split_chars


@pytest.fixture(scope="module")
def cl100k():
    return TiktokenCounter("cl100k_base")


@pytest.mark.parametrize(("text", "tokens"), [
    ("Hello world", 2),                               # "Hello" | " world"
    ("The capital of Germany is Berlin.", 7),         # The| capital| of| Germany| is| Berlin|.
    ("", 0),
])
def test_cl100k_counts_by_hand(cl100k, text, tokens):
    assert cl100k.count(text).tokens == tokens


def test_byte_fallback_characters(cl100k):
    # "🤗 hi" -> b'\xf0\x9f' | b'\xa4' | b'\x97' | b' hi': the emoji is split over 3 tokens
    assert (cl100k.count("🤗 hi").tokens, cl100k.count("🤗 hi").fallback_chars) == (4, 1)
    # "Ελληνικά": 'Ε' is split (b'\xce' | b'\x95'); the other 7 letters are whole tokens
    assert cl100k.count("Ελληνικά").fallback_chars == 1


def test_split_chars_by_hand():
    # "aé" is bytes a | c3 a9; token lengths [2, 1] put a boundary inside 'é'
    assert split_chars("aé", [2, 1]) == 1
    assert split_chars("aé", [1, 2]) == 0
    assert split_chars("aé", [3]) == 0


def test_o200k_loads_offline():
    assert TiktokenCounter("o200k_base").count("Hello world").tokens == 2


def test_operator_columns(cl100k):
    import pyarrow as pa

    op = TokenCounter([TokenizerSpec(name="c", kind="tiktoken", encoding="cl100k_base")])
    out = op.process(pa.table({"text": ["Hello world", "héllo"]}))
    assert out.column("n_bytes").to_pylist() == [11, 6]
    assert out.column("n_chars").to_pylist() == [11, 5]
    assert out.column("tokens__c").to_pylist()[0] == 2


def test_premium_formula():
    assert premium(30, 20) == 1.5
    assert math.isnan(premium(3, 0))


def test_premium_table_uses_parallel_ids_only():
    docs = pl.LazyFrame({
        "id": ["1", "2", "1", "2", "3"],
        "lang": ["eng_Latn", "eng_Latn", "fra_Latn", "fra_Latn", "fra_Latn"],
        "n_bytes": [10, 10, 12, 12, 99], "n_chars": [10, 10, 12, 12, 99],
        "tokens__t": [4, 6, 6, 9, 50], "fallback_chars__t": [0, 0, 0, 3, 0],
    })
    rows = {r["lang"]: r for r in premium_table(docs, ["t"], "eng_Latn", 0.10).to_pylist()}
    # eng: 4 + 6 = 10 tokens; fra (ids 1, 2 only; id 3 has no English side): 6 + 9 = 15
    assert rows["eng_Latn"]["premium"] == 1.0
    assert rows["fra_Latn"]["premium"] == 1.5
    assert rows["fra_Latn"]["docs"] == 2
    assert rows["fra_Latn"]["unk_share"] == pytest.approx(3 / 24)  # 12.5% > 10%
    assert rows["fra_Latn"]["reliable"] is False
    assert rows["fra_Latn"]["bytes_per_token"] == pytest.approx(24 / 15)
