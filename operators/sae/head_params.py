"""Parameters of the SAE head (``params`` of an lm stage's ``kind: sae`` head), validated with the
config; ``operators.sae.head`` builds the head from them in the actor. No torch here."""

from __future__ import annotations

from pydantic import Field

from operators.base import StrictModel


class SAEHeadParams(StrictModel):
    """Parameters of the SAE head (``params`` of a ``kind: sae`` head)."""

    sae: str = Field(description="SAE directory or fsspec URL: sparsify (layers.<L>/ or flat) or SAELens.")
    layer: int = Field(description="HF hidden_states index of the residual stream the SAE reads.")
    name: str = Field("sae", pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Column prefix.")
    hidden_mean: bool = Field(False, description="Also write the mean-pooled raw state (cosine baseline).")
    skip_first: int = Field(0, ge=0, description="Leading positions left out of the mean: 0 pools all n "
                            "tokens as MoNA's Eq. 7; 1 drops x_0, an attention sink.")

    def columns(self) -> list[str]:
        cols = [idx_column(self.name), val_column(self.name)]
        return cols + ([hidden_mean_column(self.name)] if self.hidden_mean else [])


def idx_column(name: str) -> str:
    """The head's column of active SAE feature indices."""
    return f"{name}__sae_idx"


def val_column(name: str) -> str:
    """The head's column of the active features' mean activations."""
    return f"{name}__sae_val"


def hidden_mean_column(name: str) -> str:
    """The head's column of the mean hidden state (``hidden_mean: true``)."""
    return f"{name}__hidden_mean"
