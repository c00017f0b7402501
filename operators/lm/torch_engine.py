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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from operators.lm.batch import LogitMetrics, batch_results, pad_tokens, score_in_batches
from operators.lm.engine import hf_layer_index
from operators.lm.heads import Head, ModelInfo
from operators.lm.metrics import EXACT_METRICS
from operators.lm.models import (
    PROBE_TEXT,
    Encoded,
    ModelSpec,
    TextEncoder,
    check_same_tokenizer,
    check_tokenizer_fits,
    load_causal_lm,
    load_tokenizer,
    pick_device,
)

if TYPE_CHECKING:
    from operators.lm.engine import DocResult, EngineSettings

log = logging.getLogger("curate.lm")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {n} decoder layers found for taps")


class LayerTaps:
    """Forward hooks that keep HF ``hidden_states[L]`` for chosen L, on device.

    L = 0 is the input of block 0 (the embeddings), 1 ≤ L < n the output of block L-1; L = n (the
    last) is the decoder's final, normed output, as HF ties ``hidden_states[-1]`` to it.
    """

    def __init__(self, model: nn.Module, layers: set[int]) -> None:
        self.n = model.config.get_text_config().num_hidden_layers
        self.layers = layers
        self.captured: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model) if layers - {self.n} else None
        self._handles = []
        for layer in sorted(layers - {self.n}):
            if layer == 0:
                hook = blocks[0].register_forward_pre_hook(self._pre_hook(0), with_kwargs=True)
            else:
                hook = blocks[layer - 1].register_forward_hook(self._post_hook(layer))
            self._handles.append(hook)

    def _pre_hook(self, layer: int) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.captured[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _post_hook(self, layer: int) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            self.captured[layer] = output[0] if isinstance(output, tuple) else output
        return hook

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


def onednn_linear() -> Callable | None:
    """oneDNN's fp32 linear (``torch.ops.mkldnn._linear_pointwise``) when this torch has it."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    return lambda x, weight, bias: op(x, weight, bias, "none", [], "")


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


class LMHead:
    """Hidden states h [c,H] -> logits [c,V] as HF's model classes compute them:

        z = (h Wᵀ + b) · logit_scale / logits_scaling,   then z = s · tanh(z / s) with s the softcap

    b: the head's bias (Phi-1/1.5/2, GPT-J, CodeGen); ``logit_scale`` multiplies (Cohere),
    ``logits_scaling`` divides (Granite), ``final_logit_softcapping`` caps (Gemma 2); each is
    left out where the config does not set it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config: Any) -> None:
        self.weight, self.bias = weight, bias                                       # [V,H], [V]
        text = config.get_text_config()
        multiply, divide = getattr(text, "logit_scale", None), getattr(text, "logits_scaling", None)
        self.scale = None if multiply is None and divide is None else (multiply or 1.0) / (divide or 1.0)
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.vocab_size = self.weight.shape[0]
        cpu_fp32 = self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
        self.linear = (onednn_linear() if cpu_fp32 else None) or nn.functional.linear

    @classmethod
    def of(cls, model: nn.Module) -> LMHead:
        """The output head of an HF causal LM."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
        return cls(head.weight, getattr(head, "bias", None), model.config)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        z = self.linear(h, self.weight, self.bias)
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


class TorchEngine:
    """Scores documents with one HF causal LM (and optionally a Binoculars observer)."""

    def __init__(self, spec: ModelSpec, *, max_tokens: int = 1024, metrics: tuple[str, ...] = EXACT_METRICS,
                 layers: set[int | str] | None = None, max_batch_tokens: int = 8192,
                 observer: ModelSpec | None = None, device: str | None = None,
                 score_first_token: bool = False) -> None:
        self.spec, self.metrics, self.max_batch_tokens = spec, metrics, max_batch_tokens
        self.device = device or pick_device()
        self.tokenizer = load_tokenizer(spec)
        self.encoder = TextEncoder(self.tokenizer, max_tokens, score_first_token)
        self.model = load_causal_lm(spec, self.device)
        self.head = LMHead.of(self.model)
        check_tokenizer_fits(self.tokenizer, self.head.vocab_size, spec)
        self.num_layers = self.model.config.get_text_config().num_hidden_layers
        self.hidden_size = self.model.config.get_text_config().hidden_size
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

    def early_exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N,V] of the model cut after the block whose output is ``hidden`` [N,H]: the final
        norm, then the LM head (what a checkpoint keeping only the first k blocks computes)."""
        return self.head(self.model.base_model.norm(hidden.to(self.device)))

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.spec.name, self.hidden_size, self.num_layers, self.head.vocab_size,
                         self.device, self.model.dtype)

    def resolve_layer(self, layer: int | str) -> int:
        return hf_layer_index(layer, self.num_layers, self.spec.name)

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

    def encode(self, texts: list[str | None]) -> list[Encoded]:
        return self.encoder.encode(texts)

    def score(self, docs: list[Encoded], heads: list[Head] | None = None,
              cache_layers: set[int] | None = None) -> list[DocResult | None]:
        """DocResult per scored document (None for skipped ones), in input order."""
        return score_in_batches(docs, self.max_batch_tokens,
                                lambda ids: self._score_batch(ids, heads or [], cache_layers or set()))

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
