"""The PyTorch (HF transformers) engine: one forward pass per document feeds every metric and head.

Per micro-batch of B documents, right-padded to T tokens:

    ids [B,T] ──decoder──> h [B,T,H]  (+ tapped layers, captured by hooks, stay on device)
    scored positions: (b, t) with t + 1 < len_b  → N rows; h_sel [N,H], targets ids[b,t+1] [N]
    for each chunk of rows: logits = lm_head(h_sel[chunk]) [c,V] → metrics [c]  (never [N,V])

Right padding without an attention mask is exact for real tokens of a causal LM (a token never
attends to later positions, and the pads come last), and lets SDPA / flash attention take their
causal fast path. Documents are sorted by length and packed under a token budget
(``max_batch_tokens`` ≥ B·T) so padding stays small.

Alignment, for a document x_0 … x_{n-1} (n tokens, n - 1 scored positions):

    metrics[k][j]   j = 0 … n-2   metric k of token x_{j+1}, predicted from x_≤j
    hidden[L][j]    j = 0 … n-1   layer L's state at x_j (every token, the last one included)

so ``hidden[L][j]`` is the state that made prediction j, and ``hidden[L][n-1]`` (after reading the
last token) is kept for the consumers that read it: PAWN's gate takes h_{t+1}, MoNA pools all n
tokens. Heads see [B, T-1] metrics with ``mask`` [B, T-1] and [B, T, H] hidden states, whose
real positions are ``heads.token_mask(mask)``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from operators.lm.batch import LogitMetrics, batch_results, pad_tokens
from operators.lm.engine import batch_tokens_default
from operators.lm.heads import Head
from operators.lm.metrics import EXACT_METRICS
from operators.lm.models import (
    PROBE_TEXT,
    ModelSpec,
    TextEncoder,
    check_same_tokenizer,
    check_tokenizer_fits,
    load_causal_lm,
    load_tokenizer,
    pick_device,
)
from operators.lm.shared import (
    EngineBase,
    LMHead,
    decoder_blocks,
    hook_layers,
    keep_freed_memory,
    onednn_linear,
)

if TYPE_CHECKING:
    from operators.lm.engine import DocResult, EngineSettings

log = logging.getLogger("curate.lm")


class LayerTaps:
    """Forward hooks that keep HF ``hidden_states[L]`` for chosen L, on device.

    L = 0 is the input of block 0 (the embeddings), 1 ≤ L < n the output of block L-1; L = n (the
    last) is the decoder's final, normed output, as HF ties ``hidden_states[-1]`` to it.
    """

    def __init__(self, model: nn.Module, layers: set[int]) -> None:
        self.n = model.config.get_text_config().num_hidden_layers
        self.layers = layers
        self.captured: dict[int, torch.Tensor] = {}
        inner = layers - {self.n}
        self._handles = hook_layers(decoder_blocks(model.base_model, self.n), inner, self._put,
                                    block_input=lambda args, kwargs: args[0] if args else kwargs["hidden_states"],
                                    block_output=lambda out: out[0] if isinstance(out, tuple) else out,
                                    ) if inner else []

    def _put(self, layer: int, state: torch.Tensor) -> None:
        self.captured[layer] = state

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.captured = [], {}

    def take(self, last: torch.Tensor) -> dict[int, torch.Tensor]:
        """The captured states of this forward pass ([B,T,H] each); clears the buffer."""
        out, self.captured = self.captured, {}
        if self.n in self.layers:
            out[self.n] = last
        return out


def route_linears_to_onednn(model: nn.Module) -> int:
    """On CPU, run the model's fp32 ``nn.Linear`` layers through oneDNN; returns how many.

    torch's default CPU BLAS (MKL) reaches ~170 GFLOP/s on the 2-core AMD EPYC dev box, oneDNN
    ~310 (the same fp32 GEMM, another kernel; vLLM's CPU backend does the same).
    """
    linear = onednn_linear()
    if linear is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.forward = lambda x, m=module: linear(x, m.weight, m.bias)
            count += 1
    return count


def restore_linears(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__dict__.pop("forward", None)


class TorchEngine(EngineBase):
    """Scores documents with one HF causal LM (and optionally a Binoculars observer)."""

    def __init__(self, spec: ModelSpec, *, max_tokens: int = 1024, metrics: tuple[str, ...] = EXACT_METRICS,
                 layers: set[int | str] | None = None, max_batch_tokens: int | None = None,
                 observer: ModelSpec | None = None, device: str | None = None,
                 score_first_token: bool = False) -> None:
        self.spec, self.metrics = spec, metrics
        self.device = device or pick_device()
        on_gpu = self.device.startswith("cuda")
        self.max_batch_tokens = max_batch_tokens or batch_tokens_default(on_gpu)
        if not on_gpu:
            keep_freed_memory()
            self.trim_after_score = True
        self.tokenizer = load_tokenizer(spec)
        self.encoder = TextEncoder(self.tokenizer, max_tokens, score_first_token)
        self.model = load_causal_lm(spec, self.device)
        self.head = LMHead.of(self.model)
        check_tokenizer_fits(self.tokenizer, self.head.vocab_size, spec)
        self.num_layers = self.model.config.get_text_config().num_hidden_layers
        self.hidden_size = self.model.config.get_text_config().hidden_size
        self.vocab_size, self.dtype = self.head.vocab_size, self.model.dtype
        self._check_head(self.model, self.head)
        self.taps = LayerTaps(self.model, {self.resolve_layer(x) for x in layers or ()})
        self.observer = self.observer_head = None
        if observer is not None:
            check_same_tokenizer(self.tokenizer, load_tokenizer(observer),
                                 f"observer {observer.name!r} vs performer {spec.name!r}")
            self.observer = load_causal_lm(observer, self.device)
            self.observer_head = LMHead.of(self.observer)
            self._check_head(self.observer, self.observer_head)
            if self.observer_head.vocab_size != self.head.vocab_size:
                raise ValueError(f"observer {observer.name!r} has {self.observer_head.vocab_size} logits, "
                                 f"performer {spec.name!r} {self.head.vocab_size}: they must match")
        self.metrics_of = LogitMetrics(self.head, self.head.vocab_size, metrics, self.device, self.observer_head)

    @classmethod
    def from_settings(cls, s: EngineSettings) -> TorchEngine:
        if s.cpu_threads:
            torch.set_num_threads(s.cpu_threads)
        return cls(s.model, max_tokens=s.max_tokens, metrics=s.metrics, layers=s.layers,
                   observer=s.observer, max_batch_tokens=s.max_batch_tokens,
                   score_first_token=s.score_first_token)

    def add_taps(self, layers: set[int | str]) -> None:
        """Also capture ``layers`` (e.g. those heads read)."""
        wanted = self.taps.layers | {self.resolve_layer(x) for x in layers}
        if wanted != self.taps.layers:
            self.taps.remove()
            self.taps = LayerTaps(self.model, wanted)

    @torch.inference_mode()
    def _check_head(self, model: nn.Module, head: LMHead) -> None:
        """Our decoder + lm_head path must reproduce the stock ``model(...).logits``.

        Guards exotic output heads, and the oneDNN routing of CPU linears (undone on mismatch).
        """
        ids = torch.tensor([self.tokenizer(PROBE_TEXT)["input_ids"][:32]], device=self.device)
        want = model(input_ids=ids).logits[0].float()                               # [T,V]
        tol = (1e-3 if model.dtype == torch.float32 else 5e-2) * max(1.0, want.abs().max().item())

        def ours() -> torch.Tensor:
            return head(model.base_model(input_ids=ids).last_hidden_state[0]).float()

        if self.device == "cpu" and route_linears_to_onednn(model):
            if torch.allclose(ours(), want, atol=tol, rtol=0):
                return
            log.warning("%s: oneDNN linears changed the logits; using torch's default", type(model).__name__)
            restore_linears(model)
            head.linear = nn.functional.linear
        if not torch.allclose(ours(), want, atol=tol, rtol=0):
            raise ValueError(f"{type(model).__name__}: cannot reproduce its logits from the last hidden "
                             "state; this output head is not supported by the torch engine")

    @torch.inference_mode()
    def _score_batch(self, ids: list[list[int]], heads: list[Head],
                     cache_layers: set[int]) -> list[DocResult]:
        tokens, lengths = pad_tokens(ids, self.device)                              # [B,T], [B]
        last = self.model.base_model(input_ids=tokens, use_cache=False).last_hidden_state   # [B,T,H]
        hidden = self.taps.take(last)                                               # L -> [B,T,H]
        obs = None
        if self.observer is not None:
            obs = self.observer.base_model(input_ids=tokens, use_cache=False).last_hidden_state
        return batch_results(tokens, lengths, last, hidden, obs, self.metrics_of, heads, cache_layers,
                             self.resolve_layer)
