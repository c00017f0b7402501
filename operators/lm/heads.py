"""Heads: small models that run inside the ``lm`` actor on the engine's metrics and hidden states.

    heads:
      - {kind: pawn, params: {path: ~/.cache/curate/demo/pawn}}                  # PawnHeadParams
      - {kind: sae, params: {sae: ~/.cache/curate/demo/sae, layer: 15}}          # SAEHeadParams
      - {kind: "my_pkg.heads:build", params: {anything: 1}}                      # free dict

``kind`` selects the params model: ``pawn`` and ``sae`` (or their factories' full
"module:callable" paths) are typed, any other "module:callable" keeps a free dict that its
factory validates inside the actor. This module imports no torch: configs load fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import pyarrow as pa
from pydantic import Discriminator, Field, Tag, field_validator

from operators.base import StrictModel

Layer = int | Literal["last"]
#: Short names for head factories (``kind: pawn``); any "module:callable" path works too.
HEAD_KINDS: dict[str, str] = {"pawn": "operators.detection.head:build_head",
                             "sae": "operators.sae.head:build_head"}


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


# ---------------------------------------------------------------------------------------------
# Typed ``lm.heads[]`` entries: built-in heads' params are validated with the config
# ---------------------------------------------------------------------------------------------

PAWN_FACTORY = HEAD_KINDS["pawn"]
SAE_FACTORY = HEAD_KINDS["sae"]


class PawnHeadParams(StrictModel):
    """Parameters of the PAWN head (``params`` of a ``kind: pawn`` head)."""

    path: str = Field(description="A head saved by `curate pawn train` (directory or fsspec URL).")
    column: str = Field("pawn_score", pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Output column.")
    max_tokens: int = Field(512, gt=0, description="Positions PAWN reads per document.")


class SAEHeadParams(StrictModel):
    """Parameters of the SAE head (``params`` of a ``kind: sae`` head)."""

    sae: str = Field(description="SAE directory or fsspec URL: sparsify (layers.<L>/ or flat) or SAELens.")
    layer: int = Field(description="HF hidden_states index of the residual stream the SAE reads.")
    name: str = Field("sae", pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Column prefix.")
    hidden_mean: bool = Field(False, description="Also write the mean-pooled raw state (cosine baseline).")
    skip_first: int = Field(0, ge=0, description="Leading positions left out of the mean: 0 pools all n "
                            "tokens as MoNA's Eq. 7; 1 drops x_0, an attention sink.")

    def columns(self) -> list[str]:
        cols = [f"{self.name}__sae_idx", f"{self.name}__sae_val"]
        return cols + ([f"{self.name}__hidden_mean"] if self.hidden_mean else [])


class PawnHeadSpec(StrictModel):
    kind: Literal["pawn", "operators.detection.head:build_head"]
    params: PawnHeadParams

    def columns(self) -> list[str]:
        return [self.params.column]


class SAEHeadSpec(StrictModel):
    kind: Literal["sae", "operators.sae.head:build_head"]
    params: SAEHeadParams

    def columns(self) -> list[str]:
        return self.params.columns()


class CustomHeadSpec(StrictModel):
    """Any "module:callable" factory (or a name registered in ``HEAD_KINDS``),
    called as ``callable(params, model_info) -> Head`` in the actor; ``params`` stays a free dict."""

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _importable(cls, kind: str) -> str:
        resolve_head_factory(kind)
        return kind

    def columns(self) -> list[str]:
        return []  # unknown until the head is built


def _head_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return {"pawn": "pawn", PAWN_FACTORY: "pawn", "sae": "sae", SAE_FACTORY: "sae"}.get(kind, "custom")


HeadSpec = Annotated[
    Annotated[PawnHeadSpec, Tag("pawn")]
    | Annotated[SAEHeadSpec, Tag("sae")]
    | Annotated[CustomHeadSpec, Tag("custom")],
    Discriminator(_head_tag),
]
