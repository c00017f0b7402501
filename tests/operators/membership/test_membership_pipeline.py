"""Membership inference on a model that really saw half the documents.

A tiny Llama (2 layers, hidden 128, its own 2048-token BPE) is trained on the member half of 200
Python docs (the demo corpus's human docs, built offline from the stdlib) until its training loss
falls well below chance; the other half never enters training. Both halves then go through the real
pipeline (``lm`` stage on Ray + ``scores`` stage with a FrequencyTable from ``curate freq build``
over a disjoint reference set of docs), and ``curate eval`` must find that DC-PDD and Min-K% separate
members from non-members.

Measured through the pipeline (seed 0, 120 steps, train loss ≈ 3.9 from 7.6): AUROC DC-PDD 1.000,
Min-K% 1.000, Min-K%++ 1.000, PPL 1.000 (lower), zlib 0.902 (lower); TPR at 5% FPR 1.0 for the
first four. Asserted with margin: > 0.85. About 1 minute on 2 CPUs (25 s of it training).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli.main import main
from jobs.demo.corpus import python_doc_pool
from operators.lm.models import tokenizer_fingerprint
from operators.membership.math import FrequencyTable
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
from pipelines.tables import read_table

pytestmark = pytest.mark.slow

MAX_TOKENS = 128
STEPS = 120
AUROC_BOUND = 0.85
#: Four stages at 0.25 + read and writer 0.5 fit the 2-CPU test Ray (pipelines.runner.check_cpu_budget).
CPU = {"num_cpus": 0.25, "batch_size": 50}


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A byte-level BPE trained on ``texts``, wrapped as a HF fast tokenizer (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def train_tiny_llama(tokenizer, texts: list[str], steps: int = STEPS, seed: int = 0):
    """2-layer Llama trained on the first MAX_TOKENS tokens of ``texts``; returns (model, losses)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=2 * MAX_TOKENS, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:MAX_TOKENS] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randperm(len(ids), generator=order)[:16].tolist()
        x = torch.full((len(rows), MAX_TOKENS), tokenizer.pad_token_id)
        mask = torch.zeros_like(x)
        for j, i in enumerate(rows):
            x[j, : len(ids[i])], mask[j, : len(ids[i])] = torch.tensor(ids[i]), 1
        loss = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A trained tiny model dir, the member/non-member corpus and a disjoint reference corpus."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("membership")
    pool = python_doc_pool()
    docs, reference = pool[:200], pool[200:]
    members, non_members = docs[0::2], docs[1::2]
    tokenizer = train_tokenizer(pool)
    model, losses = train_tiny_llama(tokenizer, members)
    torch.set_num_threads(before)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    texts = members + non_members
    pq.write_table(pa.table({"id": [f"d{i:03d}" for i in range(len(texts))], "text": texts,
                             "label": [1] * len(members) + [0] * len(non_members)}),
                   _mkdir(root / "corpus") / "docs.parquet")
    for k, part in enumerate((reference[::2], reference[1::2])):  # two shards: two count batches
        pq.write_table(pa.table({"text": part}), _mkdir(root / "reference") / f"ref-{k}.parquet")
    return {"root": root, "model": root / "tiny", "tokenizer": tokenizer, "losses": losses,
            "reference": reference}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_the_model_memorised_its_members(memorised):
    losses = memorised["losses"]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_freq_build_counts_the_reference_corpus(memorised, local_ray, capsys):
    root, tokenizer = memorised["root"], memorised["tokenizer"]
    out = root / "freq.parquet"
    assert main(["freq", "build", "--input", str(root / "reference"), "--model", str(memorised["model"]),
                 "--output", str(out), "--max-tokens", str(MAX_TOKENS), "--batch-size", "32"]) == 0
    assert "|V| = 2048" in capsys.readouterr().out
    table = FrequencyTable.load(str(out))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in memorised["reference"]]
    expected = FrequencyTable.from_token_ids(ids, len(tokenizer), "tiny", MAX_TOKENS)
    assert (table.n_tokens, table.vocab_size, table.model, table.max_tokens_per_doc) == \
        (expected.n_tokens, 2048, "tiny", MAX_TOKENS)
    assert np.array_equal(table.counts, expected.counts)
    assert table.n_tokens == sum(min(len(x), MAX_TOKENS) for x in ids)
    # what was counted, and with which tokenizer, travels with the table
    files = sorted(str(f) for f in (root / "reference").glob("*.parquet"))
    assert sorted(table.source["files"]) == files and table.source["documents"] == len(memorised["reference"])
    assert table.source["content_sha256"] == hashlib.sha256(
        b"".join(Path(f).read_bytes() for f in table.source["files"])).hexdigest()
    assert table.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)


def test_dcpdd_and_min_k_separate_members(memorised, local_ray, capsys):
    root = memorised["root"]
    freq = root / "freq.parquet"
    if not freq.exists():  # normally written by the test above; independent when run alone
        FrequencyTable.from_token_ids(
            [memorised["tokenizer"](t, add_special_tokens=False)["input_ids"] for t in memorised["reference"]],
            2048, "tiny", MAX_TOKENS).save(str(freq))
    cfg = parse_config({
        "name": "membership", "input": {"url": str(root / "corpus")}, "output": {"url": str(root / "out")},
        "stages": [
            {"op": "lm", "model": {"name": "tiny", "path": str(memorised["model"])}, "max_tokens": MAX_TOKENS,
             "resources": CPU},
            {"op": "lowercase_text", "resources": CPU},
            {"op": "lm", "model": {"name": "tiny_lower", "path": str(memorised["model"])},
             "text_column": "text_lower", "max_tokens": MAX_TOKENS, "keep_positions": True, "resources": CPU},
            {"op": "scores", "model": "tiny", "min_k": 0.2, "dcpdd": {"freq_table": str(freq), "a": 0.01},
             "lowercase": {"enabled": True, "model": "tiny_lower"}, "resources": CPU},
        ]})
    result = run_pipeline(cfg, "2025-01-01")
    assert result.status == "committed" and result.tables["documents"] == 200
    _check_lowercase_pass(root / "out" / "documents")
    scores = ["tiny__dcpdd", "tiny__mink", "tiny__minkpp", "tiny__ppl", "tiny__zlib"]
    assert main(["eval", "--input", str(root / "out" / "documents"), "--scores", ",".join(scores),
                 "--output", str(root / "eval")]) == 0
    print(capsys.readouterr().out)
    report = {r["score"]: r for r in json.loads((root / "eval" / "eval.json").read_text())["scores"]}
    assert {r["n_missing"] for r in report.values()} == {0}
    for name, direction in [("tiny__dcpdd", "higher"), ("tiny__mink", "higher"), ("tiny__minkpp", "higher"),
                            ("tiny__ppl", "lower")]:
        assert report[name]["direction"] == direction, name
        assert report[name]["auroc"] > AUROC_BOUND, (name, report[name]["auroc"])


def _check_lowercase_pass(documents: Path) -> None:
    """The second lm pass read text_lower, and the ratio is mean NLL(x) / mean NLL(lower(x))."""
    t = read_table(str(documents)).to_pydict()
    changed = [i for i, (a, b) in enumerate(zip(t["text"], t["text_lower"], strict=True)) if a != b]
    assert changed and all(t["text_lower"][i] == t["text"][i].lower() for i in range(len(t["text"])))
    for i in changed[:5]:
        assert t["tiny__token_ids"][i] != t["tiny_lower__token_ids"][i]
        expected = (t["tiny__nll_sum"][i] / t["tiny__n_scored"][i]) / \
            (t["tiny_lower__nll_sum"][i] / t["tiny_lower__n_scored"][i])
        assert t["tiny__lowercase"][i] == pytest.approx(expected, rel=1e-4)
