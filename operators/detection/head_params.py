"""Parameters of the PAWN head (``params`` of an lm stage's ``kind: pawn`` head), validated with the
config; ``operators.detection.head`` builds the head from them in the actor. No torch here."""

from __future__ import annotations

from pydantic import Field

from operators.base import StrictModel

#: Positions PAWN reads per document (the paper's truncation); ``operators.detection.pawn.MAX_TOKENS``.
PAWN_MAX_TOKENS = 512


class PawnHeadParams(StrictModel):
    """Parameters of the PAWN head (``params`` of a ``kind: pawn`` head)."""

    path: str = Field(description="A head saved by `curate pawn train` (directory or fsspec URL).")
    column: str = Field("pawn_score", pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Output column.")
    max_tokens: int = Field(PAWN_MAX_TOKENS, gt=0, description="Positions PAWN reads per document.")
