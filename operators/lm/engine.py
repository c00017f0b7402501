"""The engine contract every ``lm`` backend meets, and the table that picks a backend.

An engine loads one causal LM (plus, optionally, a Binoculars observer) and scores encoded
documents in one forward pass each: per-position metrics, hidden-state taps and the heads that read
them all come from that pass. ``operators.lm.torch_engine`` and ``operators.lm.vllm_engine``
implement it (``operators.lm.backends`` names them all); the ``lm`` stage sees only this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from operators.lm.heads import Head, Layer, ModelInfo
    from operators.lm.models import Encoded, ModelSpec


@dataclass
class DocResult:
    """One scored document of n tokens: metrics row j scores x_{j+1} (n - 1 rows); hidden row j is
    the state at x_j (n rows, the last token's included); head outputs."""

    metrics: dict[str, np.ndarray]                             # name -> [n-1] float32
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [n, H] float32
    heads: dict[str, Any] = field(default_factory=dict)        # head column -> value


#: Padded tokens per forward pass when the stage sets none. On CPU smaller steps are faster: at 8,192
#: every step's activations (SmolLM2's MLP: 50 MB) were fresh mmap'd pages, ~14% of the lm stage's
#: CPU time in page faults; at 2,048 they are reused (1,030 -> 1,200 tokens/s; docs/internals.md,
#: "Where the lm stage's time goes").
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 2048, 8192


def batch_tokens_default(on_gpu: bool) -> int:
    """``max_batch_tokens`` when the stage leaves it unset."""
    return GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS


@dataclass(frozen=True)
class EngineSettings:
    """What an engine loads and computes; the ``lm`` stage derives it from its config."""

    model: ModelSpec
    backend: str = "torch"                               # a key of backends.BACKENDS (LMStageConfig.backend)
    max_tokens: int = 1024
    metrics: tuple[str, ...] = ()
    layers: set[Layer] = field(default_factory=set)      # tapped from the start (heads may add more)
    observer: ModelSpec | None = None                    # Binoculars observer (same tokenizer)
    max_batch_tokens: int | None = None                 # None: batch_tokens_default(on the device)
    cpu_threads: int | None = None
    score_first_token: bool = False                      # context token where the tokenizer adds none
    vllm: Any = None                                     # VLLMOptions for backend 'vllm'


class Engine(Protocol):
    """One loaded model that scores documents; every backend implements exactly this."""

    spec: ModelSpec

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Engine:
        """Load the model(s) ``settings`` name."""
        ...

    def model_info(self) -> ModelInfo:
        """What heads learn about the model (sizes, device, dtype)."""
        ...

    def resolve_layer(self, layer: Layer) -> int:
        """HF ``hidden_states`` index of ``layer`` ("last" and -1 = n); ValueError if out of range."""
        ...

    def add_taps(self, layers: set[Layer]) -> None:
        """Keep these layers' hidden states on the device during ``score`` (heads and caching read them)."""
        ...

    def encode(self, texts: list[str | None]) -> list[Encoded]:
        """Token ids per text (BOS first where the tokenizer adds one), cut to ``max_tokens``."""
        ...

    def score(self, docs: list[Encoded], heads: list[Head] | None = None,
              cache_layers: set[int] | None = None) -> list[DocResult | None]:
        """One DocResult per scored document (None for skipped ones), in input order."""
        ...


def hf_layer_index(layer: Layer, num_layers: int, model: str) -> int:
    """HF ``hidden_states`` index of ``layer``: "last" and -1 are the final (normed) layer n, 0 the
    embeddings, L in 1..n-1 the output of block L-1; ValueError if out of range."""
    n = num_layers
    index = n if layer == "last" else int(layer)
    index = n + 1 + index if index < 0 else index
    if not 0 <= index <= n:
        raise ValueError(f"layer {layer!r} out of range for {model!r} ({n} layers: 0..{n}, 'last')")
    return index
