"""Embedding texts outside a pipeline with the same engine and SAE head the ``lm`` stage uses (training, evaluation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from operators.lm.metrics import chunks
from operators.sae.head import SAEHead, hidden_mean_column, idx_column, val_column

# ---------------------------------------------------------------------------------------------
# Outside the lm stage: the same head through the same engine
# ---------------------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """Sample embeddings of n texts (rows of skipped texts are empty / zeros, ``ok`` False)."""

    idx: list[np.ndarray]
    val: list[np.ndarray]
    hidden_mean: np.ndarray | None  # [n, H]
    ok: np.ndarray  # [n] bool: the engine scored the text
    d_sae: int


def open_tap_engine(model: Any, layer: int, max_tokens: int = 1024, max_batch_tokens: int | None = None,
                    vllm: Any = None) -> Any:
    """The engine of ``model`` (a ``ModelSpec``, whose backend it uses, or a local path: torch)
    tapping ``layer``; ``vllm``: the lm stage's ``VLLMOptions``."""
    from operators.lm.backends import open_engine
    from operators.lm.engine import EngineSettings
    from operators.lm.models import ModelSpec

    spec = model if isinstance(model, ModelSpec) else ModelSpec(name="lm", path=str(model))
    return open_engine(EngineSettings(model=spec, backend=spec.backend, max_tokens=max_tokens, metrics=(), layers={layer},
                                      max_batch_tokens=max_batch_tokens, vllm=vllm))


def embed_texts(engine: Any, head: SAEHead, texts: Sequence[str | None], batch: int = 64) -> Embeddings:
    """Embed ``texts`` with ``head`` exactly as the ``lm`` stage does (same engine, same head)."""
    name, hidden_size = head.params.name, engine.model_info().hidden_size
    idx, val, means, ok = [], [], [], []
    texts = list(texts)
    for rows in chunks(len(texts), batch):
        part = texts[rows]
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
    texts = list(texts)
    for rows in chunks(len(texts), batch):
        part = texts[rows]
        for result in engine.score(engine.encode(list(part)), cache_layers={resolved}):
            if result is None:
                continue
            states = result.hidden[resolved][skip_first:]
            parts.append(states[: max_rows - total])
            total += len(parts[-1])
            if total >= max_rows:
                return torch.from_numpy(np.concatenate(parts))
    if not parts:
        raise ValueError("no activations collected: every text was empty or shorter than 2 tokens")
    return torch.from_numpy(np.concatenate(parts))
