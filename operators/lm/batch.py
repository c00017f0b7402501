"""One forward pass's states -> per-document results; shared by every engine backend.

A backend runs the decoder over a micro-batch of B documents and hands over right-padded tensors:

    tokens [B,T]   ids (pads after each document's length)
    last   [B,T,H] final (normed) hidden states, the LM head's input
    hidden {L: [B,T,H]} tapped layers (HF ``hidden_states`` indexing)
    obs    [B,T,H] the Binoculars observer's final states, or None

``batch_results`` turns them into one ``DocResult`` per document: the exact per-position metrics
(``LogitMetrics``: logits built ``rows`` at a time on the states' device, never [N, V]), the
cached layers, and the heads' columns. Row j of every metric scores x_{j+1}; hidden row j is the
state at x_j, every token included (see ``operators.lm.torch_engine``). ``xent`` (with an
observer) has one row more, at every token x_0 … x_{n-1}: Binoculars' cross-perplexity averages
every non-pad position of the two models' logits, the last one (which predicts past the text)
included, as the reference does (``ahans30/Binoculars``, ``binoculars/metrics.py``, ``entropy``);
heads see its first n - 1 rows, aligned with the other metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from operators.lm.engine import DocResult
from operators.lm.metrics import chunk_rows, chunks, cross_entropy, token_metrics

if TYPE_CHECKING:
    import torch

    from operators.lm.heads import Head
    from operators.lm.models import Encoded

Logits = Callable[["torch.Tensor"], "torch.Tensor"]   # hidden [c,H] -> logits [c,V]


class LogitMetrics:
    """Exact per-position metrics from final hidden states, one chunk of logits at a time."""

    def __init__(self, head: Logits, vocab_size: int, names: tuple[str, ...], device: str,
                 observer_head: Logits | None = None) -> None:
        self.head, self.observer_head = head, observer_head
        self.vocab_size, self.names, self.device = vocab_size, names, device
        # logits rows per chunk: [rows, V] float32 buffers of 512 MiB on GPU; on CPU ~20 MiB (106
        # rows of SmolLM2's 49,152), so that the ~10 passes over a chunk run from cache: metrics of
        # 13k tokens took 3.6 s in 682-row chunks and 1.7 s in 96-row ones on the 2-core dev box
        # (the vllm_full row of bench.lm_engine: 702 -> 853 tokens/s)
        self.rows = chunk_rows(vocab_size, (1 << 27) if str(device).startswith("cuda") else (5 << 20))
        self._scratch: tuple[torch.Tensor, ...] | None = None

    def __call__(self, h: torch.Tensor, targets: torch.Tensor,
                 obs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Metrics of ``targets`` [N] after final states ``h`` [N,H] (observer states ``obs`` [N,H])."""
        import torch

        scratch = self._workspace(min(self.rows, h.shape[0]))
        parts: dict[str, list[torch.Tensor]] = {}
        for rows in chunks(h.shape[0], self.rows):
            logits = self.head(h[rows])                                             # [c,V]
            if obs is not None and self.observer_head is not None:
                parts.setdefault("xent", []).append(cross_entropy(self.observer_head(obs[rows]), logits))
            for k, v in token_metrics(logits, targets[rows], self.names, scratch).items():
                parts.setdefault(k, []).append(v)
        if not parts:
            return {k: torch.empty(0, device=h.device) for k in ("logprob", *self.names)}
        return {k: torch.cat(v) for k, v in parts.items()}

    def cross_entropy(self, h: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """xent [N] of the observer's states ``obs`` [N,H] against the performer's ``h`` [N,H]."""
        return cross_entropy(self.observer_head(obs), self.head(h))

    def _workspace(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Two reusable [rows, V] float32 scratch buffers."""
        import torch

        if self._scratch is None or self._scratch[0].shape[0] < rows:
            self._scratch = tuple(torch.empty(rows, self.vocab_size, device=self.device) for _ in range(2))
        return self._scratch


def plan_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so that len(group) · max length ≤ ``max_batch_tokens``.

    A document longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def score_in_batches(docs: list[Encoded], max_batch_tokens: int,
                     score_batch: Callable[[list[list[int]]], list[DocResult]]) -> list[DocResult | None]:
    """``score_batch`` over length-sorted micro-batches of the scored documents; one result per
    document in input order (None for skipped ones)."""
    results: list[DocResult | None] = [None] * len(docs)
    live = [i for i, d in enumerate(docs) if d.scored]
    for group in plan_batches([len(docs[i].ids or ()) for i in live], max_batch_tokens):
        rows = [live[g] for g in group]
        for i, result in zip(rows, score_batch([docs[i].ids for i in rows]), strict=True):
            results[i] = result
    return results


def pad_tokens(ids: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B,T] (pad 0) and lengths [B] on ``device``."""
    import torch

    lengths = torch.tensor([len(x) for x in ids])
    tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for b, row in enumerate(ids):
        tokens[b, : len(row)] = torch.tensor(row)
    return tokens.to(device), lengths.to(device)


def batch_results(tokens: torch.Tensor, lengths: torch.Tensor, last: torch.Tensor,
                  hidden: dict[int, torch.Tensor], obs: torch.Tensor | None, metrics: LogitMetrics,
                  heads: list[Head], cache_layers: set[int],
                  resolve_layer: Callable[[int | str], int]) -> list[DocResult]:
    """One DocResult per row of a right-padded micro-batch (see the module docstring)."""
    import torch

    t = torch.arange(tokens.shape[1], device=tokens.device)
    tmask = t[None, :] < lengths[:, None]                                       # [B,T] real tokens
    mask = tmask[:, 1:]                                                         # [B,T-1] scored rows
    targets = tokens[:, 1:][mask]                                               # [N]
    obs_rows = obs[:, :-1][mask] if obs is not None else None
    flat = metrics(last[:, :-1][mask], targets, obs_rows)                      # name -> [N]
    bounds = np.cumsum((lengths - 1).tolist())[:-1]                            # per-doc row splits
    per_doc = {k: np.split(v.cpu().numpy(), bounds) for k, v in flat.items()}
    results = [DocResult({k: parts[b] for k, parts in per_doc.items()}) for b in range(tokens.shape[0])]
    if obs is not None:  # Binoculars' x-ppl averages every position, the last token's too (module doc)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        tail = metrics.cross_entropy(last[rows, lengths - 1], obs[rows, lengths - 1]).float().cpu().numpy()
        for r, x in zip(results, tail, strict=True):
            r.metrics["xent"] = np.append(r.metrics["xent"], np.float32(x))
    token_bounds = np.cumsum(lengths.tolist())[:-1]                            # per-doc token splits
    for layer in cache_layers:
        cached = hidden[layer][tmask].float().cpu().numpy()                    # [Σ n_b, H]
        for r, part in zip(results, np.split(cached, token_bounds), strict=True):
            r.hidden[layer] = part
    if heads:
        dense = {}
        for k, v in flat.items():
            dense[k] = torch.zeros(mask.shape, dtype=v.dtype, device=v.device)  # [B,T-1]
            dense[k][mask] = v
        for head in heads:
            taps = {layer: hidden[resolve_layer(layer)] for layer in head.layers}
            for col, values in head(dense, taps, mask).items():
                for r, value in zip(results, values, strict=True):
                    r.heads[col] = value
    return results
