"""The vLLM engine's output head equals HF's on architectures whose head is more than h Wᵀ: a bias
(GPT-J, Phi), a logits divisor (Granite); a head it cannot reproduce is refused by name.

Tiny random checkpoints are made here from their HF configs; HF's ``model(ids).logits`` is the
reference, the vLLM engine's logits are its ``LMHead`` over the states vLLM pools.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from operators.lm.models import ModelSpec
from operators.lm.torch_engine import LMHead
from tests.operators.lm.tiny_lm import build_tiny_head_model, vllm_head_logits, vllm_tap_storage

IDS = [1, 3, 5, 7, 8, 3, 9, 13, 4, 6, 12, 18]
KINDS = ("gptj", "phi", "granite")


@pytest.mark.slow
def test_vllm_logits_equal_hf_for_biased_and_scaled_heads(tmp_path, local_ray):
    paths = [build_tiny_head_model(kind, tmp_path / kind) for kind in KINDS]
    task = local_ray.remote(num_cpus=1, max_calls=1)(vllm_head_logits)
    got = local_ray.get(task.remote([str(p) for p in paths], IDS), timeout=900)
    for kind, path, logits in zip(KINDS, paths, got, strict=True):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            want = hf(torch.tensor([IDS])).logits[0].numpy()
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0, err_msg=kind)
        no_extras = LMHead(hf.get_output_embeddings().weight, None, LlamaConfig())  # what the head did before
        with torch.no_grad():
            plain = no_extras(hf.base_model(torch.tensor([IDS])).last_hidden_state[0]).numpy()
        assert np.abs(plain - want).max() > 1e-2, kind  # the bias / divisor matters at this tolerance


def test_heads_it_cannot_reproduce_are_refused_by_name():
    from operators.lm.vllm_engine import check_output_head

    spec = ModelSpec(name="t", path="org/model")
    weight = torch.zeros(4, 2)
    falcon = LlamaConfig(lm_head_multiplier=2.0, architectures=["FalconH1ForCausalLM"])
    with pytest.raises(ValueError, match=r"'t' \(FalconH1ForCausalLM\).*lm_head_multiplier.*backend: torch"):
        check_output_head(LMHead(weight, None, falcon), falcon, None, spec)
    granite = LlamaConfig(logits_scaling=4.0, architectures=["GraniteForCausalLM"])
    check_output_head(LMHead(weight, None, granite), granite, SimpleNamespace(scale=0.25, soft_cap=None), spec)
    with pytest.raises(ValueError, match=r"vLLM scales its logits by 1.0.*HF config by 0.25"):
        check_output_head(LMHead(weight, None, granite), granite, SimpleNamespace(scale=1.0, soft_cap=None), spec)


def test_granite_divisor_reaches_the_torch_engine_too(tmp_path):
    """The torch engine's head check used to refuse Granite (its logits are divided by logits_scaling)."""
    from operators.lm.torch_engine import TorchEngine

    path = build_tiny_head_model("granite", Path(tmp_path) / "granite")
    engine = TorchEngine(ModelSpec(name="g", path=str(path)), max_tokens=16, device="cpu")
    assert engine.head.scale == pytest.approx(0.25)


@pytest.mark.slow
def test_vllm_taps_are_copies_not_views_of_what_the_model_updates(tmp_path, local_ray):
    """Layer 0 is block 0's input, which vLLM's block 0 keeps as its running residual (updated in
    place by the fused add-RMSNorm on CUDA): a tap must own its storage."""
    path = build_tiny_head_model("llama", tmp_path / "llama")
    task = local_ray.remote(num_cpus=1, max_calls=1)(vllm_tap_storage)
    shared = local_ray.get(task.remote(str(path), IDS, {0, 1}), timeout=900)
    assert shared == {0: False, 1: False}
