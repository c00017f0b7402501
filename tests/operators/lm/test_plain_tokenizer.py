"""``PlainTokenizer`` reads a generic-backend ``tokenizer.json`` with ``tokenizers`` alone: the
``TextEncoder`` over it must give exactly what it gives over transformers' tokenizer."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from operators.lm.models import ModelSpec, TextEncoder, load_text_tokenizer, load_tokenizer
from operators.lm.plain_tokenizer import PlainTokenizer, plain_tokenizer_json


@pytest.fixture(scope="module")
def demo_dir() -> str:
    from jobs.demo.model import prepare_demo_model

    return str(prepare_demo_model(log=lambda _m: None))


def _texts(n: int) -> list[str]:
    from jobs.demo.cache import cache_root

    shards = sorted((cache_root() / "demo" / "corpus").glob("*.parquet"))
    texts = [t for s in shards for t in pq.read_table(s, columns=["text"]).column("text").to_pylist()][:n]
    return texts + ["", "   ", "a", "naïve café — ½ ✓ 🙂 " * 40, "<|im_start|>user\nhi<|im_end|>", "x" * 5000]


@pytest.mark.parametrize("score_first_token", [False, True])
@pytest.mark.parametrize("max_tokens", [8, 64, 256])
def test_text_encoder_over_plain_tokenizer_equals_transformers(demo_dir, max_tokens, score_first_token):
    texts = _texts(120)
    plain = TextEncoder(PlainTokenizer(demo_dir), max_tokens, score_first_token)
    hf = TextEncoder(load_tokenizer(ModelSpec(name="m", path=demo_dir)), max_tokens, score_first_token)
    assert plain.bos == hf.bos
    assert plain.encode(texts) == hf.encode(texts)
    cut = [t for t, e in zip(texts, hf.encode(texts), strict=True) if e.truncated]
    assert len(cut) > 10  # the spans below are of really cut documents
    assert [plain.scored_text(t) for t in texts] == [hf.scored_text(t) for t in texts]


def test_special_token_ids_are_the_configs(demo_dir):
    plain, hf = PlainTokenizer(demo_dir), load_tokenizer(ModelSpec(name="m", path=demo_dir))
    assert (plain.bos_token_id, plain.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert plain.bos_token_id == plain.tok.token_to_id("<|im_start|>")


def test_only_a_generic_backend_dir_is_read_plainly(demo_dir, tmp_path):
    assert isinstance(load_text_tokenizer(ModelSpec(name="m", path=demo_dir)), PlainTokenizer)
    specific = tmp_path / "specific"
    shutil.copytree(demo_dir, specific, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((specific / "tokenizer_config.json").read_text())
    (specific / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert plain_tokenizer_json(str(specific)) is None
    with pytest.raises(ValueError, match="generic backend"):
        PlainTokenizer(str(specific))
    assert not isinstance(load_text_tokenizer(ModelSpec(name="m", path=str(specific))), PlainTokenizer)


def test_fingerprint_equals_transformers(demo_dir, tmp_path):
    """The DC-PDD table check reads the plain tokenizer first: its fingerprint must be transformers'."""
    from operators.lm.models import tokenizer_fingerprint

    hf = load_tokenizer(ModelSpec(name="m", path=demo_dir))
    assert tokenizer_fingerprint(PlainTokenizer(demo_dir)) == tokenizer_fingerprint(hf)
    extra = tmp_path / "extra"
    shutil.copytree(demo_dir, extra, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((extra / "tokenizer_config.json").read_text())
    config |= {"extra_special_tokens": ["<file_sep>", "<repo_name>"], "pad_token": {"__type": "AddedToken", "content": "<filename>", "lstrip": False, "normalized": False,
                                   "rstrip": False, "single_word": False, "special": True}}
    (extra / "tokenizer_config.json").write_text(json.dumps(config))
    with_extra = tokenizer_fingerprint(PlainTokenizer(str(extra)))
    assert with_extra == tokenizer_fingerprint(load_tokenizer(ModelSpec(name="m", path=str(extra))))
    assert with_extra != tokenizer_fingerprint(hf)  # the extra special tokens count
