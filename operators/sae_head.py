"""The SAE head: sparse sample embeddings computed inside the LM actor, on the LM's device.

Ma et al., "Task-Specific Data Selection for Instruction Tuning via Monosemantic Neuronal
Activations". For a document with layer-L residual states h_t (HF ``hidden_states[L]``) the head
encodes every token with a sparse autoencoder and mean-pools the codes:

    z_t = SAE.encode(h_t)                            [d_sae], sparse (TopK: k non-zeros)
    e   = (1 / |P|) Σ_{t ∈ P} z_t                     the sample embedding
    P   = {t : t ≥ skip_first, t < n - 1}             pooled positions

The engine hands heads the states of x_0 … x_{n-2} (the last token's state predicts nothing and
is not kept). ``skip_first`` (default 1) drops x_0: the first position is an attention sink whose
residual norm is ~100× the others (SmolLM2-135M, layer 15: ~23,000 vs ~150), so it would
dominate both the SAE's training loss and the mean. A document with no pooled position gets the
zero embedding (similarity 0).

Columns, for a head named ``<name>`` (default ``sae``):

    <name>__sae_idx       list<int32>     non-zero latents of e, ascending
    <name>__sae_val       list<float32>   their values (> 0)
    <name>__hidden_mean   list<float32>   (1 / |P|) Σ_{t ∈ P} h_t, [H]; only with hidden_mean: true

In a pipeline (kind ``operators.sae_head:build_head``; the short name ``sae`` resolves where this
module has been imported, e.g. through ``operators.registry``)::

    - op: lm
      model: {name: smollm2, path: ...}
      heads: [{kind: "operators.sae_head:build_head", params: {sae: DIR_OR_URL, layer: 15, name: sae}}]

Outside Ray, ``embed_texts`` runs the same head through a ``TorchEngine`` (target examples,
evaluation) and ``collect_activations`` gathers the pooled positions' states (SAE training).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import torch

from operators.heads import SAEHeadParams
from operators.lm.stage import HEAD_KINDS, ModelInfo
from operators.sae import SparseAutoencoder, load_sae, to_sparse

HEAD_KINDS.setdefault("sae", "operators.sae_head:build_head")

#: Elements of one [rows, d_sae] code buffer (64 MiB in float32): bounds memory for wide SAEs.
CODE_BUFFER = 1 << 24


def idx_column(name: str) -> str:
    return f"{name}__sae_idx"


def val_column(name: str) -> str:
    return f"{name}__sae_val"


def hidden_mean_column(name: str) -> str:
    return f"{name}__hidden_mean"


# ---------------------------------------------------------------------------------------------
# Loading with a clear shape check
# ---------------------------------------------------------------------------------------------


def _has(url: str, name: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url.rstrip("/") + "/" + name)
    return fs.exists(root)


def sae_weights_file(path: str, layer: int) -> tuple[str, int | None]:
    """(weights file, sub-layer) of the SAE at ``path``: ``layers.<layer>/`` when present, else flat."""
    path = os.fspath(path)
    sub = path.rstrip("/") + f"/layers.{layer}"
    for where, pick in ((sub, layer), (path, None)):
        for name in ("sae_weights.safetensors", "sae.safetensors"):
            if _has(where, name):
                return f"{where.rstrip('/')}/{name}", pick
    raise FileNotFoundError(f"no SAE at {path}: expected {path}/layers.{layer}/ or {path}/ holding "
                            "cfg.json + sae.safetensors (sparsify) or sae_weights.safetensors (SAELens)")


def load_head_sae(path: str, layer: int, hidden_size: int, model: str = "the model") -> SparseAutoencoder:
    """Load the SAE for ``layer`` and check that it reads vectors of the model's hidden size."""
    file, pick = sae_weights_file(path, layer)
    sae = load_sae(path, layer=pick)
    if sae.cfg.d_in != hidden_size:
        raise ValueError(
            f"{file}: SAE d_in = {sae.cfg.d_in}, but {model} has hidden size {hidden_size}: expected "
            f"W_enc [{hidden_size}, {sae.cfg.d_sae}] (sparsify encoder.weight [{sae.cfg.d_sae}, {hidden_size}]); "
            "was this SAE trained on another model?")
    return sae


# ---------------------------------------------------------------------------------------------
# The math on device
# ---------------------------------------------------------------------------------------------


def pooled_mask(mask: torch.Tensor, skip_first: int) -> torch.Tensor:
    """mask [B, T] with the first ``skip_first`` positions of every row set False."""
    pooled = mask.clone()
    pooled[:, :skip_first] = False
    return pooled


@torch.inference_mode()
def mean_codes(sae: SparseAutoencoder, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """e_b = Σ_t m_bt SAE.encode(h_bt) / Σ_t m_bt: hidden [B, T, H], mask [B, T] -> [B, d_sae] float32.

    Only masked-in positions are encoded, ``CODE_BUFFER / d_sae`` rows at a time, so no
    [B, T, d_sae] tensor is built. Rows with no position get zeros.
    """
    rows = hidden[mask]  # [N, H]
    doc = mask.nonzero()[:, 0]  # [N] document of each row
    sums = torch.zeros(mask.shape[0], sae.cfg.d_sae, device=hidden.device, dtype=torch.float32)
    step = max(1, CODE_BUFFER // sae.cfg.d_sae)
    for start in range(0, rows.shape[0], step):
        z = sae.encode(rows[start:start + step]).float()  # [c, d_sae]
        sums.index_add_(0, doc[start:start + step], z)
    return sums / mask.sum(dim=1, keepdim=True).clamp(min=1).float()


@torch.inference_mode()
def mean_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1 / Σ_t m_bt) Σ_t m_bt h_bt: [B, T, H], [B, T] -> [B, H] float32 (zeros for empty rows)."""
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def sparse_rows(codes: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """[B, d_sae] -> per row (indices int32, values float32) of its non-zeros."""
    dense = codes.cpu().numpy()
    pairs = [to_sparse(row) for row in dense]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------------------------------------
# The head (engine ``Head`` protocol)
# ---------------------------------------------------------------------------------------------


class SAEHead:
    """Per micro-batch: SAE codes of layer ``layer`` on device, mean-pooled, stored sparsely."""

    def __init__(self, params: SAEHeadParams, info: ModelInfo) -> None:
        self.params = params
        self.layers = [params.layer]
        self.sae = load_head_sae(params.sae, params.layer, info.hidden_size, f"model {info.name!r}")
        self.sae.to(info.device)
        self.d_sae = self.sae.cfg.d_sae

    def output_schema(self) -> pa.Schema:
        name = self.params.name
        fields = [(idx_column(name), pa.list_(pa.int32())), (val_column(name), pa.list_(pa.float32()))]
        if self.params.hidden_mean:
            fields.append((hidden_mean_column(name), pa.list_(pa.float32())))
        return pa.schema(fields)

    def __call__(self, metrics: dict[str, Any], hidden: dict[int, Any], mask: Any) -> dict[str, list]:
        h = hidden[self.params.layer]  # [B, T, H]
        pooled = pooled_mask(mask, self.params.skip_first)  # [B, T]
        idx, val = sparse_rows(mean_codes(self.sae, h, pooled))
        out: dict[str, list] = {idx_column(self.params.name): idx, val_column(self.params.name): val}
        if self.params.hidden_mean:
            out[hidden_mean_column(self.params.name)] = list(mean_hidden(h, pooled).cpu().numpy())
        return out


def build_head(params: dict, info: ModelInfo) -> SAEHead:
    """Head factory for the ``lm`` stage: ``kind: sae`` (params validated as ``SAEHeadParams``)."""
    return SAEHead(SAEHeadParams.model_validate(params), info)


# ---------------------------------------------------------------------------------------------
# Outside Ray: the same head through a TorchEngine
# ---------------------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """Sample embeddings of n texts (rows of skipped texts are empty / zeros, ``ok`` False)."""

    idx: list[np.ndarray]
    val: list[np.ndarray]
    hidden_mean: np.ndarray | None  # [n, H]
    ok: np.ndarray  # [n] bool: the engine scored the text
    d_sae: int


def open_engine(model: Any, layer: int, max_tokens: int = 1024, max_batch_tokens: int = 8192) -> Any:
    """A ``TorchEngine`` for ``model`` (a ``ModelSpec`` or a local path) tapping ``layer``."""
    from operators.lm.models import ModelSpec
    from operators.lm.torch_engine import TorchEngine

    spec = model if isinstance(model, ModelSpec) else ModelSpec(name="lm", path=str(model))
    return TorchEngine(spec, max_tokens=max_tokens, metrics=(), layers={layer},
                       max_batch_tokens=max_batch_tokens)


def engine_info(engine: Any) -> ModelInfo:
    return ModelInfo(engine.spec.name, engine.hidden_size, engine.num_layers, engine.head.vocab_size,
                     engine.device, engine.model.dtype)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def embed_texts(engine: Any, head: SAEHead, texts: Sequence[str | None], batch: int = 64) -> Embeddings:
    """Embed ``texts`` with ``head`` exactly as the ``lm`` stage does (same engine, same head)."""
    name, hidden_size = head.params.name, engine.hidden_size
    idx, val, means, ok = [], [], [], []
    for part in _chunks(list(texts), batch):
        for result in engine.score(engine.encode(list(part)), [head]):
            ok.append(result is not None)
            heads = result.heads if result is not None else {}
            idx.append(np.asarray(heads.get(idx_column(name), []), dtype=np.int32))
            val.append(np.asarray(heads.get(val_column(name), []), dtype=np.float32))
            if head.params.hidden_mean:
                means.append(np.asarray(heads.get(hidden_mean_column(name), np.zeros(hidden_size)), np.float32))
    hidden = np.stack(means) if means else None
    return Embeddings(idx, val, hidden, np.array(ok, dtype=bool), head.d_sae)


def collect_activations(engine: Any, texts: Sequence[str | None], layer: int, max_rows: int,
                        skip_first: int = 1, batch: int = 64) -> torch.Tensor:
    """Layer-``layer`` states [N ≤ max_rows, H] of the pooled positions (t ≥ skip_first) of ``texts``,
    in order, stopping once ``max_rows`` are gathered (cap documents with the engine's max_tokens)."""
    resolved = engine.resolve_layer(layer)
    parts, total = [], 0
    for part in _chunks(list(texts), batch):
        for result in engine.score(engine.encode(list(part)), cache_layers={resolved}):
            if result is None:
                continue
            rows = result.hidden[resolved][skip_first:]
            parts.append(rows[: max_rows - total])
            total += len(parts[-1])
            if total >= max_rows:
                return torch.from_numpy(np.concatenate(parts))
    if not parts:
        raise ValueError("no activations collected: every text was empty or shorter than 2 tokens")
    return torch.from_numpy(np.concatenate(parts))
