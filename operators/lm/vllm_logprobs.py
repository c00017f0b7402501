"""``vllm.mode: prompt_logprobs``: vLLM's top-k prompt logprobs of the very ids the other engines score.

The cheaper, explicit alternative to the exact engine (``operators.lm.vllm_engine``). Each
document goes in as ``TokensPrompt(prompt_token_ids=ids)`` (ids from the shared ``TextEncoder``)
with ``SamplingParams(max_tokens=1, prompt_logprobs=k)``. For every position with context vLLM
returns the observed token's logprob and its rank (number of tokens with logprob ≥ it), both
exact, and the top-k logprobs, from which ``topk_metrics`` estimates entropy, top_p and logp2
(output as ``*_topk`` columns, never under the exact names). No hidden states, heads or observer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from operators.lm.engine import DocResult
from operators.lm.heads import ModelInfo
from operators.lm.metrics import TOPK_METRICS, topk_metrics
from operators.lm.models import Encoded, ModelSpec, TextEncoder, check_tokenizer_fits, load_tokenizer
from operators.lm.vllm_setup import VLLMOptions, engine_kwargs, load_llm, vllm_environment

if TYPE_CHECKING:
    from operators.lm.engine import EngineSettings

class VLLMPromptLogprobsEngine:
    """Scores documents with ``vllm.LLM`` prompt logprobs (see the module docstring)."""

    def __init__(self, spec: ModelSpec, *, max_tokens: int, metrics: tuple[str, ...] = TOPK_METRICS,
                 options: VLLMOptions, score_first_token: bool = False, cpu_threads: int | None = None) -> None:
        vllm_environment(options, cpu_threads)
        import torch
        from vllm import SamplingParams

        self.spec, self.metrics, self.top_k = spec, metrics, options.top_k
        self.tokenizer = load_tokenizer(spec)
        self.encoder = TextEncoder(self.tokenizer, max_tokens, score_first_token)
        self.on_gpu = torch.cuda.is_available()
        self.llm = load_llm(spec, engine_kwargs(spec, max_tokens, options, self.on_gpu, exact=False))
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        check_tokenizer_fits(self.tokenizer, self.vocab_size, spec)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=options.top_k, detokenize=False,
                                     flat_logprobs=True)

    @classmethod
    def from_settings(cls, s: EngineSettings) -> VLLMPromptLogprobsEngine:
        if s.observer is not None or s.layers:
            raise ValueError("vllm.mode 'prompt_logprobs' has no hidden-state taps or observer; use mode: exact")
        return cls(s.model, max_tokens=s.max_tokens, metrics=s.metrics, options=s.vllm or VLLMOptions(),
                   score_first_token=s.score_first_token, cpu_threads=s.cpu_threads)

    def model_info(self) -> ModelInfo:
        config = self.llm.llm_engine.model_config
        return ModelInfo(self.spec.name, config.get_hidden_size(), config.hf_text_config.num_hidden_layers,
                         self.vocab_size, "cuda" if self.on_gpu else "cpu", config.dtype)

    def resolve_layer(self, layer: Any) -> int:
        raise ValueError("backend 'vllm' has no hidden-state taps; use vllm.mode: exact")

    def add_taps(self, layers: set) -> None:
        if layers:
            raise ValueError("backend 'vllm' has no hidden-state taps; use vllm.mode: exact")

    def encode(self, texts: list[str | None]) -> list[Encoded]:
        return self.encoder.encode(texts)

    def score(self, docs: list[Encoded], heads: list | None = None,
              cache_layers: set[int] | None = None) -> list[DocResult | None]:
        """DocResult per scored document (None for skipped ones), in input order."""
        if heads or cache_layers:
            raise ValueError("backend 'vllm' cannot run heads or cache hidden states; use vllm.mode: exact")
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
