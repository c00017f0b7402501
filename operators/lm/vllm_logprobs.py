"""The vLLM engine: prompt logprobs of the very token ids the torch engine scores.

Each document goes in as ``TokensPrompt(prompt_token_ids=ids)`` (ids from the shared
``TextEncoder``, so both backends score the same tokens) with
``SamplingParams(max_tokens=1, prompt_logprobs=k)``. For every position with context vLLM returns
the observed token's logprob and its rank (number of tokens with logprob ≥ it) — both exact — and
the top-k logprobs, from which ``topk_metrics`` estimates entropy, top_p and logp2 (output as
``*_topk`` columns). Hidden states, heads and observers need ``backend: torch``.

Inside a Ray actor the engine core runs in-process by default (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
set before vLLM is imported; ``vllm.multiprocessing: true`` turns it back on). vLLM's CPU platform
forces the ``spawn`` start method for its core and worker processes; that re-imports ``__main__``
(it works under Ray's import-guarded worker, fails from an unguarded script) and, on the 2-core dev
box, took ~26 s to first result against ~15 s in-process, with two more processes competing for
the actor's cores. In-process, vLLM binds the actor's OpenMP threads and replaces
``torch.set_num_threads`` for the whole process: harmless in a dedicated actor, and why tests and
benchmarks keep vLLM in its own actor or child process. On CPU ``gpu_memory_utilization`` is the
share of RAM vLLM reserves (KV cache included); ``kv_cache_gib`` fixes the KV cache instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from operators.base import StrictModel
from operators.lm.engine import DocResult
from operators.lm.heads import ModelInfo
from operators.lm.metrics import TOPK_METRICS, topk_metrics
from operators.lm.models import Encoded, ModelSpec, TextEncoder, check_tokenizer_fits, load_tokenizer

if TYPE_CHECKING:
    from operators.lm.engine import EngineSettings

log = logging.getLogger("curate.lm")
CPU_MEMORY_SHARE, GPU_MEMORY_SHARE = 0.3, 0.85


class VLLMOptions(StrictModel):
    """Engine settings for ``backend: vllm`` (ignored by the torch backend)."""

    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory (of RAM on CPU); default 0.3 CPU, 0.85 GPU.")
    top_k: int = Field(20, ge=1, le=1000, description="Prompt logprobs kept per position (the estimates use them).")
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    enforce_eager: bool | None = Field(None, description="Default: True on CPU (no compile), False on GPU.")
    tensor_parallel_size: int = Field(1, ge=1)
    kv_cache_gib: float | None = Field(None, gt=0, description="Fixed KV-cache size instead of the share.")
    multiprocessing: bool = Field(False, description="Run vLLM's engine core in its own process.")


def vllm_environment(options: VLLMOptions) -> None:
    """Process environment vLLM reads at import / engine start."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if options.multiprocessing else "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_kwargs(spec: ModelSpec, max_tokens: int, options: VLLMOptions, on_gpu: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for this model and options."""
    where, _ = spec.load_args()
    kwargs: dict[str, Any] = {
        "model": str(Path(spec.path).expanduser()) if spec.is_gguf else where,
        # ids come from our TextEncoder; vLLM's own tokenizer only serves its start-up checks
        "tokenizer": where,
        "skip_tokenizer_init": spec.is_gguf,
        "dtype": spec.dtype if spec.dtype != "auto" else ("auto" if on_gpu else "float32"),
        "max_model_len": max_tokens + 1,  # the prompt plus the one token vLLM insists on sampling
        "gpu_memory_utilization": options.gpu_memory_utilization
        or (GPU_MEMORY_SHARE if on_gpu else CPU_MEMORY_SHARE),
        "enforce_eager": options.enforce_eager if options.enforce_eager is not None else not on_gpu,
        "max_logprobs": options.top_k,
        "max_num_seqs": options.max_num_seqs,
        "tensor_parallel_size": options.tensor_parallel_size,
        "enable_prefix_caching": False,  # every prompt position must be computed for its logprobs
        "trust_remote_code": spec.trust_remote_code,
        "seed": 0,
    }
    if spec.revision:
        kwargs["revision"] = spec.revision
    if options.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = max(options.max_num_batched_tokens, max_tokens + 1)
    if options.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
    return kwargs


class VLLMEngine:
    """Scores documents with ``vllm.LLM`` prompt logprobs (see the module docstring)."""

    def __init__(self, spec: ModelSpec, *, max_tokens: int, metrics: tuple[str, ...] = TOPK_METRICS,
                 options: VLLMOptions, score_first_token: bool = False) -> None:
        vllm_environment(options)
        import torch
        from vllm import LLM, SamplingParams

        self.spec, self.metrics, self.top_k = spec, metrics, options.top_k
        self.tokenizer = load_tokenizer(spec)
        self.encoder = TextEncoder(self.tokenizer, max_tokens, score_first_token)
        self.on_gpu = torch.cuda.is_available()
        self.llm = LLM(**engine_kwargs(spec, max_tokens, options, self.on_gpu))
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        check_tokenizer_fits(self.tokenizer, self.vocab_size, spec)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=options.top_k, detokenize=False,
                                     flat_logprobs=True)

    @classmethod
    def from_settings(cls, s: EngineSettings) -> VLLMEngine:
        if s.observer is not None or s.layers:
            raise ValueError("backend 'vllm' has no hidden-state taps or observer; use backend: torch")
        return cls(s.model, max_tokens=s.max_tokens, metrics=s.metrics, options=s.vllm or VLLMOptions(),
                   score_first_token=s.score_first_token)

    def model_info(self) -> ModelInfo:
        config = self.llm.llm_engine.model_config
        return ModelInfo(self.spec.name, config.get_hidden_size(), config.hf_text_config.num_hidden_layers,
                         self.vocab_size, "cuda" if self.on_gpu else "cpu", config.dtype)

    def resolve_layer(self, layer: Any) -> int:
        raise ValueError("backend 'vllm' has no hidden-state taps; use backend: torch")

    def add_taps(self, layers: set) -> None:
        if layers:
            raise ValueError("backend 'vllm' has no hidden-state taps; use backend: torch")

    def encode(self, texts: list[str | None]) -> list[Encoded]:
        return self.encoder.encode(texts)

    def score(self, docs: list[Encoded], heads: list | None = None,
              cache_layers: set[int] | None = None) -> list[DocResult | None]:
        """DocResult per scored document (None for skipped ones), in input order."""
        if heads or cache_layers:
            raise ValueError("backend 'vllm' cannot run heads or cache hidden states; use backend: torch")
        from vllm.inputs import TokensPrompt

        live = [i for i, d in enumerate(docs) if d.scored]
        results: list[DocResult | None] = [None] * len(docs)
        if not live:
            return results
        prompts = [TokensPrompt(prompt_token_ids=docs[i].ids) for i in live]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        for i, out in zip(live, outputs, strict=True):
            values = self._position_metrics(out.prompt_logprobs, docs[i].ids)
            results[i] = DocResult({k: values[k] for k in ("logprob", *self.metrics)})
        return results

    def _position_metrics(self, flat: Any, ids: list[int]) -> dict[str, np.ndarray]:
        """Rows 1..T-1 of vLLM's flat prompt logprobs -> metric arrays [T-1].

        Each row holds the prompt token first (its logprob and rank), then the top-k.
        """
        k = self.top_k
        start = np.asarray(flat.start_indices[1:])                      # [n], row 0 has no context
        if np.any(np.asarray(flat.end_indices[1:]) - start != k + 1):
            raise RuntimeError(f"vLLM returned other than 1 + {k} logprobs per prompt position")
        logprobs = np.asarray(flat.logprobs, dtype=np.float64)
        token_ids = np.asarray(flat.token_ids)
        ranks = np.asarray(flat.ranks, dtype=np.int64)
        if not np.array_equal(token_ids[start], ids[1:]):
            raise RuntimeError("vLLM prompt logprobs are not for the submitted token ids")
        top = logprobs[start[:, None] + 1 + np.arange(k)]                # [n, k]
        return topk_metrics(logprobs[start], ranks[start], top, self.vocab_size)
