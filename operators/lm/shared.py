"""What both exact backends share: the output head, the decoder-block taps, and the engine methods
that do not depend on how the forward pass runs (``EngineBase``).

Neither backend imports the other; both import this module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from operators.lm.batch import score_in_batches
from operators.lm.engine import hf_layer_index
from operators.lm.heads import ModelInfo

if TYPE_CHECKING:
    from operators.lm.engine import DocResult
    from operators.lm.heads import Head
    from operators.lm.models import Encoded, ModelSpec, TextEncoder


#: glibc ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _glibc() -> Any:
    """glibc, loaded once (None without it: macOS, musl)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> None:
    """On CPU, have glibc's malloc reuse the memory of one forward pass in the next.

    Every step allocates its activations anew. By default glibc maps fresh pages for each large
    buffer and hands them back when freed, so each step pays a zero-filled page fault per 4 KiB; in
    a Ray actor, whose batches run on a thread of their own (a thread arena trims eagerly), that
    was 13% of the lm stage's CPU time. Buffers up to ``mmap_threshold`` now come from malloc's
    heap, and up to ``trim_threshold`` of freed memory stays with the process. Measured in
    docs/internals.md ("Where the lm stage's time goes"). Does nothing without glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def release_freed_memory() -> None:
    """Hand the memory glibc's malloc holds free back to the system (``malloc_trim(0)``), after a
    batch on CPU.

    With ``keep_freed_memory`` the step buffers come from malloc's heap, and the trim threshold only
    returns free memory at the top of it: what is freed below a live chunk stays resident. In the lm
    stage that grew by 250-300 MiB per batch of 128 documents (RSS 2.3 GiB after the first batch,
    3.4 after the fifth) and peaked anywhere from 2.1 to 3.3 GiB between identical runs. Trimming
    after each batch keeps RSS at 2.1 GiB, at the same seconds per batch: the steps within a batch
    still reuse their buffers. Does nothing without glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def onednn_linear() -> Callable | None:
    """oneDNN's fp32 linear (``torch.ops.mkldnn._linear_pointwise``) when this torch has it."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    return lambda x, weight, bias: op(x, weight, bias, "none", [], "")


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


def decoder_blocks(root: nn.Module, num_layers: int) -> nn.ModuleList:
    """The list of ``num_layers`` decoder blocks under ``root`` (the first ModuleList of that length)."""
    for module in root.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"{type(root).__name__}: no ModuleList of {num_layers} decoder blocks found for taps")


def hook_layers(blocks: nn.ModuleList, layers: Iterable[int], put: Callable[[int, torch.Tensor], None],
                block_input: Callable[[tuple, dict], torch.Tensor],
                block_output: Callable[[Any], torch.Tensor]) -> list[Any]:
    """Forward hooks that ``put(L, state)`` HF ``hidden_states[L]`` for each L in ``layers`` (0 ≤ L < n):
    L = 0 is the input of block 0 (a pre-hook), L ≥ 1 the output of block L-1. ``block_input`` and
    ``block_output`` read the state from a block's arguments / output (each backend's own layout).
    Returns the hook handles."""
    handles = []
    for layer in sorted(layers):
        if layer == 0:
            def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                put(0, block_input(args, kwargs))
            handles.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(_module: nn.Module, _args: tuple, output: Any, layer: int = layer) -> None:
                put(layer, block_output(output))
            handles.append(blocks[layer - 1].register_forward_hook(post))
    return handles


class EngineBase:
    """The ``Engine`` methods both exact backends share; a backend sets the attributes below and
    implements ``_score_batch`` (one padded micro-batch) and ``add_taps``."""

    spec: ModelSpec
    encoder: TextEncoder
    max_batch_tokens: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    device: str
    dtype: Any
    #: On CPU: return malloc's free memory after every ``score`` call (``release_freed_memory``).
    trim_after_score: bool = False

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.spec.name, self.hidden_size, self.num_layers, self.vocab_size, self.device,
                         self.dtype)

    def resolve_layer(self, layer: int | str) -> int:
        return hf_layer_index(layer, self.num_layers, self.spec.name)

    def encode(self, texts: list[str | None]) -> list[Encoded]:
        return self.encoder.encode(texts)

    def score(self, docs: list[Encoded], heads: list[Head] | None = None,
              cache_layers: set[int] | None = None) -> list[DocResult | None]:
        """DocResult per scored document (None for skipped ones), in input order."""
        results = score_in_batches(docs, self.max_batch_tokens,
                                   lambda ids: self._score_batch(ids, heads or [], cache_layers or set()))
        if self.trim_after_score:
            release_freed_memory()
        return results

    def _score_batch(self, ids: list[list[int]], heads: list[Head], cache_layers: set[int]) -> list[DocResult]:
        raise NotImplementedError
