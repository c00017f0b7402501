"""The torch LM engine and the ``lm`` stage on the demo model (SmolLM2-135M, offline) and a tiny
random Llama, and the stage end to end through the real pipeline on a local Ray."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from jobs.demo.model import prepare_demo_gguf
from operators.lm import head_specs
from operators.lm import heads as lm_heads
from operators.lm.models import SKIP_EMPTY, SKIP_SHORT, ModelSpec
from operators.lm.stage import LMStageConfig
from operators.lm.torch_engine import restore_linears, route_linears_to_onednn
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
from pipelines.tables import read_table

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "",
    "   \n\t ",
    "Hello",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "A short one.",
    "Cats sleep a lot. " * 40,  # > 64 tokens: truncated
]
WORDS = ["<unk>", "<s>", "</s>", "the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "is", ".",
         ",", "and", "of", "to", "in"]


@pytest.fixture(scope="session")
def tiny_bos_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama whose word-level tokenizer puts <s> (id 1) in front."""
    out = tmp_path_factory.mktemp("tiny-bos")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


class MeanHead:
    """A test head: masked mean logprob, and mean L2 norm of the last layer's states."""

    layers = [-1]

    def __init__(self, params: dict, info: lm_heads.ModelInfo) -> None:
        self.prefix, self.hidden_size = params["prefix"], info.hidden_size

    def output_schema(self) -> pa.Schema:
        return pa.schema([(f"{self.prefix}__mean_logprob", pa.float64()),
                          (f"{self.prefix}__hidden_norm", pa.float64())])

    def __call__(self, metrics, hidden, mask) -> dict[str, list]:
        tokens = lm_heads.token_mask(mask)
        assert hidden[-1].shape[:2] == tokens.shape and hidden[-1].shape[2] == self.hidden_size
        n = mask.sum(-1)
        mean_lp = (metrics["logprob"] * mask).sum(-1) / n
        norm = (hidden[-1].float().norm(dim=-1) * tokens).sum(-1) / tokens.sum(-1)
        return {f"{self.prefix}__mean_logprob": mean_lp.tolist(), f"{self.prefix}__hidden_norm": norm.tolist()}


@pytest.fixture(scope="module")
def op(demo_model):
    """One loaded operator serves most checks: taps, cached states, a head, small max_tokens."""
    head_specs.HEAD_KINDS["test_mean"] = f"{__name__}:MeanHead"
    cfg = LMStageConfig(model={"name": "smol", "path": str(demo_model)}, max_tokens=64, taps=[0],
                        cache_hidden=[5, "last"], max_batch_tokens=256,
                        heads=[{"kind": "test_mean", "params": {"prefix": "probe"}}])
    return cfg.build()


@pytest.fixture(scope="module")
def table(op) -> pa.Table:
    return op.process(pa.table({"text": TEXTS}))


def naive_metrics(model, ids: list[int]) -> dict[str, np.ndarray]:
    """Full-vocabulary reference from ``model(...).logits`` in float64."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1)
    p, lt = lp.exp(), lp.gather(-1, torch.tensor(ids[1:])[:, None])
    at_least = lp >= lt
    return {k: v.numpy() for k, v in {
        "logprob": lt[:, 0], "entropy": -(p * lp).sum(-1), "max_logprob": lp.max(-1).values,
        "rank": at_least.double().mean(-1), "top_p": (p * at_least).sum(-1), "logp2": (p * lp**2).sum(-1)}.items()}


def test_columns_and_types(op, table):
    m = "smol"
    assert table.num_rows == len(TEXTS)
    assert table.schema == op.output_schema()
    for name in ("logprob", "entropy", "max_logprob", "rank", "top_p", "logp2"):
        assert table.schema.field(f"{m}__{name}").type == pa.list_(pa.float32())
    assert table.schema.field(f"{m}__token_ids").type == pa.list_(pa.int32())
    assert table.schema.field(f"{m}__hidden_last").type == pa.list_(pa.list_(pa.float32()))
    assert table.schema.field(f"{m}__nll_sum").type == pa.float64()
    assert table.schema.field(f"{m}__n_scored").type == pa.int32()
    assert {"probe__mean_logprob", "probe__hidden_norm"} <= set(table.column_names)


def test_no_bos_for_smollm2_and_ids_match_the_tokenizer(op, table):
    rows = table.to_pylist()
    assert op.engine.encoder.bos is None  # SmolLM2's tokenizer adds no BOS
    tok = op.engine.tokenizer
    first = rows[0]
    assert first["smol__token_ids"] == tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert first["smol__n_scored"] == len(first["smol__token_ids"]) - 1 == len(first["smol__logprob"])


def test_bos_is_prepended_when_the_tokenizer_adds_one(tiny_bos_model):
    op = LMStageConfig(model={"name": "tiny", "path": str(tiny_bos_model)}, max_tokens=4).build()
    rows = op.process(pa.table({"text": ["the cat sat", "the cat sat on the mat", "cat"]})).to_pylist()
    assert rows[0]["tiny__token_ids"] == [1, 3, 5, 7]  # <s> the cat sat
    assert rows[0]["tiny__n_scored"] == 3 and rows[0]["tiny__truncated"] is False  # every word scored
    assert rows[1]["tiny__token_ids"] == [1, 3, 5, 7] and rows[1]["tiny__truncated"] is True
    assert rows[2]["tiny__token_ids"] == [1, 5] and rows[2]["tiny__skip_reason"] is None


def test_truncation_flag_and_long_text_cut(op, table):
    rows = table.to_pylist()
    assert rows[6]["smol__truncated"] is True and len(rows[6]["smol__token_ids"]) == 64
    assert rows[0]["smol__truncated"] is False
    # a text longer than the encoder's character cap is cut before tokenizing: same first ids
    long_text = "Numbers: " + " ".join(str(i) for i in range(4000))
    assert len(long_text) > op.engine.encoder.char_cap
    doc = op.engine.encode([long_text])[0]
    assert doc.truncated and doc.ids == op.engine.tokenizer(long_text, add_special_tokens=False)["input_ids"][:64]


def test_empty_whitespace_and_one_token_docs_get_null_metrics_and_a_reason(table):
    rows = table.to_pylist()
    for row in rows[1:3]:
        assert row["smol__skip_reason"] == SKIP_EMPTY
        assert row["smol__logprob"] is None and row["smol__nll_sum"] is None and row["smol__token_ids"] is None
        assert row["probe__mean_logprob"] is None
    one = rows[3]
    assert one["smol__skip_reason"] == SKIP_SHORT and one["smol__n_scored"] == 0
    assert len(one["smol__token_ids"]) == 1 and one["smol__logprob"] is None


def test_nll_sum_is_minus_sum_of_logprobs(table):
    for row in table.to_pylist():
        if row["smol__logprob"] is not None:
            assert row["smol__nll_sum"] == pytest.approx(-sum(row["smol__logprob"]), rel=1e-6)


def test_metrics_match_a_full_logits_reference(op, table):
    row = table.to_pylist()[4]
    want = naive_metrics(op.engine.model, row["smol__token_ids"])
    for name, ref in want.items():
        np.testing.assert_allclose(row[f"smol__{name}"], ref, rtol=1e-4, atol=1e-4, err_msg=name)


def test_batched_equals_one_by_one_and_chunking_changes_nothing(op):
    docs = op.engine.encode(TEXTS)
    together = op.engine.score(docs)
    assert len({len(d.ids) for d in docs if d.scored}) > 2  # really padded batches
    rows = op.engine.metrics_of.rows
    try:
        op.engine.metrics_of.rows = 7  # 7 positions per logits chunk
        alone = [op.engine.score([d])[0] for d in docs]
    finally:
        op.engine.metrics_of.rows = rows
    for a, b in zip(together, alone, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            for name in a.metrics:
                np.testing.assert_allclose(a.metrics[name], b.metrics[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_taps_and_cached_hidden_match_hf_hidden_states(op, table):
    row = table.to_pylist()[0]
    ids = torch.tensor([row["smol__token_ids"]])
    with torch.inference_mode():
        hs = op.engine.model(input_ids=ids, output_hidden_states=True).hidden_states
    n = row["smol__n_scored"] + 1  # every token's state, the last one included
    assert len(row["smol__hidden_5"]) == n == len(row["smol__token_ids"])
    np.testing.assert_allclose(np.array(row["smol__hidden_5"]), hs[5][0, :n].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.array(row["smol__hidden_last"]), hs[-1][0, :n].numpy(), atol=1e-4)
    op.engine.score(op.engine.encode([TEXTS[0]]))
    assert set(op.engine.taps.layers) == {0, 5, 30}  # taps + cache_hidden + the head's -1


def test_head_sees_aligned_metrics_and_hidden(table):
    for row in table.to_pylist():
        if row["smol__logprob"] is None:
            assert row["probe__mean_logprob"] is None
            continue
        assert row["probe__mean_logprob"] == pytest.approx(np.mean(row["smol__logprob"]), rel=1e-5)
        norms = np.linalg.norm(np.array(row["smol__hidden_last"]), axis=1)
        assert row["probe__hidden_norm"] == pytest.approx(norms.mean(), rel=1e-4)


def test_onednn_linears_reproduce_stock_logits(tiny_bos_model):
    model = LlamaForCausalLM.from_pretrained(tiny_bos_model).eval()
    ids = torch.tensor([[1, 3, 5, 7, 9, 4]])
    with torch.inference_mode():
        stock = model(input_ids=ids).logits
        assert route_linears_to_onednn(model) == 2 * 7 + 1  # q k v o gate up down per layer + lm_head
        routed = model(input_ids=ids).logits
        restore_linears(model)
        assert "forward" not in model.lm_head.__dict__
    torch.testing.assert_close(routed, stock, rtol=1e-5, atol=1e-5)


def test_keep_positions_false_keeps_only_scalars(demo_model):
    op = LMStageConfig(model={"name": "smol", "path": str(demo_model)}, keep_positions=False,
                       metrics=["logprob"]).build()
    out = op.process(pa.table({"text": TEXTS[:2]}))
    assert out.column_names == ["smol__nll_sum", "smol__n_scored", "smol__truncated", "smol__skip_reason"]
    assert out.column("smol__nll_sum")[0].as_py() > 0


def test_observer_xent_against_itself_is_the_entropy(demo_model):
    op = LMStageConfig(model={"name": "perf", "path": str(demo_model)}, metrics=["logprob", "entropy"],
                       observer={"name": "obs", "path": str(demo_model)}).build()
    row = op.process(pa.table({"text": TEXTS[:1]})).to_pylist()[0]
    # every position, the last one too (Binoculars' metrics.py): n rows against the metrics' n - 1
    assert len(row["perf__xent"]) == len(row["perf__entropy"]) + 1 == len(row["perf__token_ids"])
    np.testing.assert_allclose(row["perf__xent"][:-1], row["perf__entropy"], rtol=1e-4, atol=1e-4)
    model = op.engine.model
    with torch.inference_mode():
        last = torch.log_softmax(model(input_ids=torch.tensor([row["perf__token_ids"]])).logits[0, -1].double(), -1)
    assert row["perf__xent"][-1] == pytest.approx(-(last.exp() * last).sum().item(), abs=1e-4)
    assert row["perf__xent_sum"] == pytest.approx(sum(row["perf__xent"]), rel=1e-5)


def test_observer_with_another_tokenizer_fails_at_load(demo_model, tiny_bos_model):
    cfg = LMStageConfig(model={"name": "perf", "path": str(demo_model)},
                        observer={"name": "obs", "path": str(tiny_bos_model)})
    with pytest.raises(ValueError, match="tokenizers differ"):
        cfg.build()


def test_config_errors_name_the_field(demo_model):
    base = {"name": "t", "input": {"url": "/data"}}
    stage = {"op": "lm", "model": {"name": "m", "path": "/no/such/model"}}
    with pytest.raises(ValueError, match=r"stages\.0\.lm\.model\.path: .*local model path not found: /no/such/model"):
        parse_config({**base, "stages": [stage]})
    hub = parse_config({**base, "stages": [{"op": "lm", "model": {"name": "m", "path": "HuggingFaceTB/SmolLM2-135M"}}]})
    assert hub.stages[0].stage_name == "lm_m"
    with pytest.raises(ValueError, match="top-k estimates, made only with"):
        LMStageConfig(model={"name": "m", "path": str(demo_model)}, metrics=["entropy_topk"])
    with pytest.raises(ValueError, match="cannot import"):
        LMStageConfig(model={"name": "m", "path": str(demo_model)}, heads=[{"kind": "nowhere:Head"}])
    two = parse_config({**base, "stages": [{"op": "lm", "model": {"name": "a", "path": str(demo_model)}},
                                           {"op": "lm", "model": {"name": "b", "path": str(demo_model)}}]})
    assert [s.stage_name for s in two.stages] == ["lm_a", "lm_b"]
    with pytest.raises(ValueError, match="out of range"):
        LMStageConfig(model={"name": "m", "path": str(demo_model)}, taps=[99]).build()


def test_gguf_spec_loads_from_its_directory(tmp_path):
    gguf = tmp_path / "m" / "model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    spec = ModelSpec(name="g", path=str(gguf))
    assert spec.load_args() == (str(gguf.parent), {"trust_remote_code": False, "gguf_file": "model.Q4_1.gguf"})
    with pytest.raises(ValueError, match="local model path not found"):
        ModelSpec(name="g", path=str(tmp_path / "missing.gguf"))


def test_gguf_file_scores_like_the_converted_demo_model(op):
    """``model.path`` naming the original .gguf (kept by prepare_demo_gguf; ~20 s to load)."""
    path = os.environ.get("CURATE_TEST_GGUF") or str(prepare_demo_gguf(log=lambda _msg: None))
    gguf = LMStageConfig(model={"name": "smol", "path": path}).build()
    docs = gguf.engine.encode(TEXTS[:1])
    assert docs[0].ids == op.engine.encode(TEXTS[:1])[0].ids
    np.testing.assert_allclose(gguf.engine.score(docs)[0].metrics["logprob"],
                               op.engine.score(docs)[0].metrics["logprob"], atol=1e-3)


def test_lm_stage_end_to_end_through_the_pipeline(tmp_path, demo_model, local_ray):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(TEXTS))], "text": TEXTS}),
                   corpus / "part-0.parquet")
    raw = {"name": "lm-e2e", "input": {"url": str(corpus)}, "output": {"url": str(tmp_path / "out")},
           "stages": [{"op": "lm", "model": {"name": "smol", "path": str(demo_model)}, "max_tokens": 32,
                       "cache_hidden": ["last"], "resources": {"batch_size": 4}}]}
    result = run_pipeline(parse_config(raw), "2026-05-01")
    assert result.status == "committed"
    docs = read_table(str(tmp_path / "out" / "documents" / "run_date=2026-05-01")).to_pylist()
    texts = {d["id"]: d for d in docs}
    assert set(texts) >= {"d0", "d3", "d4", "d5", "d6"}  # empty / whitespace may be quarantined by the reader
    for d in docs:
        if d["smol__skip_reason"] is None:
            assert len(d["smol__logprob"]) == d["smol__n_scored"] == len(d["smol__token_ids"]) - 1
            assert len(d["smol__hidden_last"]) == d["smol__n_scored"] + 1
            assert len(d["smol__hidden_last"][0]) == 576
            assert d["smol__nll_sum"] == pytest.approx(-math.fsum(d["smol__logprob"]), rel=1e-6)
    assert texts["d6"]["smol__truncated"] is True and len(texts["d6"]["smol__token_ids"]) == 32
    assert texts["d3"]["smol__skip_reason"] == SKIP_SHORT
    stages = [s.name for s in result.stages]
    assert stages == ["read", "lm_smol"]


def test_batch_tokens_default_by_device(tiny_bos_model):
    """Unset ``max_batch_tokens``: 2,048 padded tokens per step on CPU (faster there), 8,192 on GPU;
    a set value wins. The vLLM KV cache and the declared memory follow the same value."""
    from operators.lm.engine import batch_tokens_default
    from operators.lm.vllm_setup import VLLMOptions, kv_cache_bytes

    assert (batch_tokens_default(False), batch_tokens_default(True)) == (2048, 8192)
    op = LMStageConfig(model={"name": "tiny", "path": str(tiny_bos_model)}, max_tokens=4).build()
    assert op.engine.max_batch_tokens == 2048
    op = LMStageConfig(model={"name": "tiny", "path": str(tiny_bos_model)}, max_tokens=4, max_batch_tokens=512).build()
    assert op.engine.max_batch_tokens == 512
    spec = op.cfg.model
    assert kv_cache_bytes(spec, 256, 2048, VLLMOptions()) < kv_cache_bytes(spec, 256, 8192, VLLMOptions())


def test_a_cpu_engine_returns_mallocs_free_memory_after_each_call(op, monkeypatch):
    """On CPU every ``score`` call ends with ``release_freed_memory`` (the heap otherwise grew by
    250-300 MiB per batch of the lm stage)."""
    from operators.lm import shared

    calls = []
    monkeypatch.setattr(shared, "release_freed_memory", lambda: calls.append(1))
    assert op.engine.trim_after_score
    op.engine.score(op.engine.encode(TEXTS[:2]))
    assert calls == [1]
