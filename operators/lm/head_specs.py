"""The ``lm.heads[]`` config entries, and the table that names each head's factory.

    heads:
      - {kind: pawn, params: {path: ~/.cache/curate/demo/pawn}}                  # PawnHeadParams
      - {kind: sae, params: {sae: ~/.cache/curate/demo/sae, layer: 15}}          # SAEHeadParams
      - {kind: "my_pkg.heads:build", params: {anything: 1}}                      # free dict

``kind`` selects the params model: ``pawn`` and ``sae`` (or their factories' full
"module:callable" paths) are typed by their methods' packages, any other "module:callable" keeps a
free dict that its factory validates inside the actor. The factories are imported only in the
actor (``resolve_head_factory``); this module imports no torch: configs load fast.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from operators.base import StrictModel
from operators.detection.head_params import PawnHeadParams
from operators.sae.head_params import SAEHeadParams

#: Short names for head factories (``kind: pawn``); any "module:callable" path works too.
HEAD_KINDS: dict[str, str] = {"pawn": "operators.detection.head:build_head",
                             "sae": "operators.sae.head:build_head"}
PAWN_FACTORY = HEAD_KINDS["pawn"]
SAE_FACTORY = HEAD_KINDS["sae"]


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
