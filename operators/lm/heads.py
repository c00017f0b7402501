"""Heads: small models that run inside the ``lm`` actor on the engine's metrics and hidden states."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pyarrow as pa
from pydantic import Field, field_validator

from operators.base import StrictModel

Layer = int | Literal["last"]
#: Short names for head factories (``kind: pawn``); any "module:callable" path works too.
HEAD_KINDS: dict[str, str] = {"pawn": "operators.detection.head:build_head",
                             "sae": "operators.sae.head:build_head"}


class Head(Protocol):
    """A small model that reads the LM's per-position metrics and hidden states inside the actor.

    Tensors are on the LM's device, aligned on scored positions: ``metrics[k][b, j]`` is metric k
    of token x_{j+1} (float32 [B, T]), ``hidden[L][b, j]`` layer L's state at x_j ([B, T, H], for
    each L in ``layers``, HF ``hidden_states`` indexing, -1 = last), ``mask[b, j]`` True where
    the position exists (right padding). Returns one list of B values per output column.
    """

    layers: list[int]

    def output_schema(self) -> pa.Schema: ...

    def __call__(self, metrics: dict[str, Any], hidden: dict[int, Any], mask: Any) -> dict[str, list]: ...


@dataclass(frozen=True)
class ModelInfo:
    """What a head factory learns about the LM it sits on."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    device: str
    dtype: Any


class HeadSpec(StrictModel):
    """A head: ``kind`` is a name in ``HEAD_KINDS`` or "module:callable"; the callable is called as
    ``callable(params, model_info) -> Head`` inside the actor."""

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _importable(cls, kind: str) -> str:
        resolve_head_factory(kind)
        return kind


def resolve_head_factory(kind: str) -> Any:
    """Import the factory a head ``kind`` names; ValueError with the reason if it cannot."""
    target = HEAD_KINDS.get(kind, kind)
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"head kind {kind!r}: not in {sorted(HEAD_KINDS)} and not 'module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"head kind {kind!r}: cannot import {target}: {err}") from None
