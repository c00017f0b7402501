"""Token counts checked by hand, byte-fallback characters, and premiums."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.token_premium.math import premium, premium_table
from operators.token_premium.stage import TokenCounter
from operators.token_premium.tokenizers import (
    Counted,
    TiktokenCounter,
    TokenizerSpec,
    load_tokenizer,
    split_chars,
)


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
        "unk_chars__t": [0, 1, 3, 0, 0],
    })
    rows = {r["lang"]: r for r in premium_table(docs, ["t"], "eng_Latn", 0.10).to_pylist()}
    # eng: 4 + 6 = 10 tokens; fra (ids 1, 2 only; id 3 has no English side): 6 + 9 = 15
    assert rows["eng_Latn"]["premium"] == 1.0
    assert rows["fra_Latn"]["premium"] == 1.5
    assert rows["fra_Latn"]["docs"] == 2
    assert rows["fra_Latn"]["unk_share"] == pytest.approx(3 / 24)  # 12.5% UNK > 10%
    assert rows["fra_Latn"]["byte_fallback_share"] == pytest.approx(3 / 24)
    assert rows["fra_Latn"]["reliable"] is False
    assert (rows["eng_Latn"]["unk_share"], rows["eng_Latn"]["reliable"]) == (pytest.approx(1 / 20), True)
    assert rows["fra_Latn"]["bytes_per_token"] == pytest.approx(24 / 15)


def test_premium_divides_by_the_reference_over_the_same_ids():
    """A mixed corpus: English-only docs (ids 9, 10) never enter a premium; each language is
    compared with the English of exactly its own ids (deu has only id 1)."""
    docs = pl.LazyFrame({
        "id": ["1", "2", "9", "10", "1", "2", "1"],
        "lang": ["eng_Latn"] * 4 + ["fra_Latn", "fra_Latn", "deu_Latn"],
        "n_bytes": [10] * 7, "n_chars": [10] * 7,
        "tokens__t": [4, 6, 500, 700, 6, 9, 5], "fallback_chars__t": [0] * 7, "unk_chars__t": [0] * 7,
    })
    rows = {r["lang"]: r for r in premium_table(docs, ["t"], "eng_Latn", 0.10).to_pylist()}
    assert (rows["eng_Latn"]["docs"], rows["eng_Latn"]["tokens"], rows["eng_Latn"]["premium"]) == (2, 10, 1.0)
    assert rows["fra_Latn"]["premium"] == 15 / 10      # ids 1, 2 against English 4 + 6
    assert rows["deu_Latn"]["premium"] == 5 / 4        # id 1 against English 4
    alone = premium_table(docs.filter(pl.col("lang") == "eng_Latn"), ["t"], "eng_Latn", 0.10).to_pylist()
    assert [(r["docs"], r["premium"]) for r in alone] == [(4, 1.0)]
    no_ref = premium_table(docs.filter(pl.col("lang") != "eng_Latn"), ["t"], "eng_Latn", 0.10).to_pylist()
    assert {r["lang"]: r["premium"] for r in no_ref} == {"deu_Latn": None, "fra_Latn": None}


# --- the vectorised counters against the plain per-token definition ---------------------------

_UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


def _reference_split_chars(text: str, token_bytes: list[int]) -> int:
    """Per character: is some token boundary strictly inside its UTF-8 byte range?"""
    boundaries, pos, split = set(np.cumsum(token_bytes)[:-1].tolist()), 0, 0
    for ch in text:
        width = len(ch.encode("utf-8"))
        split += any(pos < b < pos + width for b in boundaries)
        pos += width
    return split


def _reference_hf_fallback(counter, text: str) -> tuple[int, int]:
    """Per token: mark its span when it is unknown / a byte piece; mark characters covered twice.
    (byte-fallback chars: byte-marked or covered twice, not UNK; UNK chars)."""
    enc = counter.tok.encode(text, add_special_tokens=False)
    unk = getattr(counter.tok.model, "unk_token", None)
    covered, in_byte, in_unk = [0] * len(text), [False] * len(text), [False] * len(text)
    for token, (start, end) in zip(enc.tokens, enc.offsets, strict=True):
        for i in range(start, end):
            covered[i] += 1
            in_unk[i] = in_unk[i] or token == unk
            in_byte[i] = in_byte[i] or re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) is not None
    fallback = sum((b or c > 1) and not u for b, c, u in zip(in_byte, covered, in_unk, strict=True))
    return fallback, sum(in_unk)


@settings(max_examples=80, deadline=None)
@given(text=_UNICODE)
def test_tiktoken_counter_matches_the_per_token_definition(cl100k, text):
    ids = cl100k.encoding.encode_ordinary(text)
    token_bytes = [len(cl100k.encoding.decode_single_token_bytes(t)) for t in ids]
    assert cl100k.count(text) == Counted(len(ids), _reference_split_chars(text, token_bytes))
    assert cl100k.count_batch([text, "x"]) == [cl100k.count(text), cl100k.count("x")]


@pytest.fixture(scope="module")
def smollm2():
    from jobs.demo.model import prepare_demo_model

    return load_tokenizer(TokenizerSpec(name="s", kind="hf", path=str(prepare_demo_model(log=lambda _m: None))))


@settings(max_examples=80, deadline=None)
@given(text=_UNICODE)
def test_hf_counter_matches_the_per_token_definition(smollm2, text):
    counted = smollm2.count(text)
    assert (counted.fallback_chars, counted.unk_chars) == _reference_hf_fallback(smollm2, text)
    assert smollm2.count_batch([text]) == [counted]


def test_hf_counter_reads_a_generic_backend_dir_as_transformers_does(smollm2):
    """The demo dir names ``TokenizersBackend``: its tokenizer.json is read directly (no transformers
    import) and counts exactly what transformers' tokenizer counts on the demo corpus."""
    from transformers import AutoTokenizer

    from jobs.demo.model import prepare_demo_model
    from operators.lm.plain_tokenizer import plain_tokenizer_json
    from operators.token_premium.tokenizers import HFCounter

    path = str(prepare_demo_model(log=lambda _m: None))
    assert plain_tokenizer_json(path) is not None
    via_transformers = HFCounter.__new__(HFCounter)
    via_transformers.tok = AutoTokenizer.from_pretrained(path).backend_tokenizer
    via_transformers.is_unk, via_transformers.is_byte = via_transformers._special_ids()
    texts = [*NON_LATIN.values(), "Hello  world\t\n", "naïve café — ½ ✓ 🙂", "x" * 300, ""]
    texts += _demo_texts(200)
    assert smollm2.count_batch(texts) == via_transformers.count_batch(texts)
    assert plain_tokenizer_json(str(Path(path).parent)) is None  # no tokenizer here: transformers decides


def _demo_texts(n: int) -> list[str]:
    from jobs.demo.cache import cache_root

    shards = sorted((cache_root() / "demo" / "corpus").glob("*.parquet"))
    return [t for s in shards for t in pq.read_table(s, columns=["text"]).column("text").to_pylist()][:n]


# --- unk_share is UNK only; byte fallback is reported apart (issue 15, item 5) -----------------

NON_LATIN = {"hin_Deva": "भारत एक विशाल देश है।", "kor_Hang": "한국은 아름다운 나라입니다.",
             "heb_Hebr": "ישראל היא מדינה קטנה."}


def test_byte_level_bpe_keeps_non_latin_rows_reliable(cl100k):
    """cl100k has no UNK: it splits these scripts into bytes and keeps the text. unk_share = 0, the
    row is reliable, and the split share shows up as byte_fallback_share."""
    texts = {"eng_Latn": "India is a large country.", **NON_LATIN}
    counted = {lang: cl100k.count(t) for lang, t in texts.items()}
    docs = pl.LazyFrame({
        "id": ["1"] * len(texts), "lang": list(texts), "n_bytes": [len(t.encode()) for t in texts.values()],
        "n_chars": [len(t) for t in texts.values()], "tokens__c": [c.tokens for c in counted.values()],
        "fallback_chars__c": [c.fallback_chars for c in counted.values()],
        "unk_chars__c": [c.unk_chars for c in counted.values()]})
    rows = {r["lang"]: r for r in premium_table(docs, ["c"], "eng_Latn", 0.10).to_pylist()}
    for lang in NON_LATIN:
        assert rows[lang]["unk_share"] == 0.0 and rows[lang]["reliable"] is True, lang
        assert rows[lang]["byte_fallback_share"] == pytest.approx(counted[lang].fallback_chars / len(texts[lang]))
    assert rows["hin_Deva"]["byte_fallback_share"] > 0.10


def test_unknown_token_characters_are_unk(tmp_path):
    """A word-level tokenizer maps unseen words to <unk>: their characters are UNK, not byte-fallback."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "cat": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    counter = load_tokenizer(TokenizerSpec(name="w", kind="hf", path=str(tmp_path)))
    assert counter.count("the dog cat") == Counted(3, 0, 3)  # "dog": 3 UNK characters
    out = TokenCounter([TokenizerSpec(name="w", kind="hf", path=str(tmp_path))]).process(
        __import__("pyarrow").table({"text": ["the dog cat"]}))
    assert out.column("unk_chars__w").to_pylist() == [3] and out.column("fallback_chars__w").to_pylist() == [0]
