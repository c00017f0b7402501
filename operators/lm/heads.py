"""The head contract: small models that run inside the ``lm`` actor on the engine's metrics and
hidden states. Head factories (``operators.detection.head``, ``operators.sae.head``, your own)
import this module; the ``lm.heads[]`` config entries that name them are
``operators.lm.head_specs``. This module imports no torch: configs load fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pyarrow as pa

Layer = int | Literal["last"]


class Head(Protocol):
    """A small model that reads the LM's per-position metrics and hidden states inside the actor.

    Tensors are on the LM's device, right-padded. ``metrics[k][b, j]`` is metric k of token
    x_{j+1} (float32 [B, T-1]) and ``mask[b, j]`` (bool [B, T-1]) is True where that scored
    position exists. ``hidden[L][b, j]`` is layer L's state at token x_j ([B, T, H], for each L in
    ``layers``, HF ``hidden_states`` indexing, -1 = last) for every token, the last one included:
    row j made prediction j, row j + 1 is the state after reading the scored token, and
    ``token_mask(mask)`` marks the real tokens. Returns one list of B values per output column.
    """

    layers: list[int]

    def output_schema(self) -> pa.Schema: ...

    def __call__(self, metrics: dict[str, Any], hidden: dict[int, Any], mask: Any) -> dict[str, list]: ...


def token_mask(mask: Any) -> Any:
    """Real tokens [B, T] from the scored-position mask [B, T-1] of documents with ≥ 2 tokens:
    token 0 always, token j ≥ 1 where position j - 1 is scored (x_j is its target)."""
    import torch

    return torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)


@dataclass(frozen=True)
class ModelInfo:
    """What a head factory learns about the LM it sits on."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    device: str
    dtype: Any
