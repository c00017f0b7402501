"""Typed ``lm.heads[]`` entries: the params of the built-in heads are validated with the config.

    heads:
      - {kind: pawn, params: {path: ~/.cache/curate/demo/pawn}}                  # PawnHeadParams
      - {kind: sae, params: {sae: ~/.cache/curate/demo/sae, layer: 15}}          # SAEHeadParams
      - {kind: "my_pkg.heads:build", params: {anything: 1}}                      # free dict

``kind`` selects the params model: ``pawn`` and ``sae`` (or their factories' full
"module:callable" paths) are typed, any other "module:callable" keeps a free dict that its
factory validates inside the actor. This module imports no torch: configs load fast.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from operators.base import StrictModel

PAWN_FACTORY = "operators.pawn_head:build_head"
SAE_FACTORY = "operators.sae_head:build_head"


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
    skip_first: int = Field(1, ge=0, description="Leading positions left out of the mean (attention sink).")

    def columns(self) -> list[str]:
        cols = [f"{self.name}__sae_idx", f"{self.name}__sae_val"]
        return cols + ([f"{self.name}__hidden_mean"] if self.hidden_mean else [])


class PawnHeadSpec(StrictModel):
    kind: Literal["pawn", "operators.pawn_head:build_head"]
    params: PawnHeadParams

    def columns(self) -> list[str]:
        return [self.params.column]


class SAEHeadSpec(StrictModel):
    kind: Literal["sae", "operators.sae_head:build_head"]
    params: SAEHeadParams

    def columns(self) -> list[str]:
        return self.params.columns()


class CustomHeadSpec(StrictModel):
    """Any "module:callable" factory (or a name registered in ``operators.lm.stage.HEAD_KINDS``),
    called as ``callable(params, model_info) -> Head`` in the actor; ``params`` stays a free dict."""

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _importable(cls, kind: str) -> str:
        from operators.lm.stage import resolve_head_factory

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
