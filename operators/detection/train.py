"""Training the PAWN head on a feature cache (Miralles-González et al., section 3)."""

from __future__ import annotations

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from operators.detection.features import read_features
from operators.detection.pawn import PawnConfig, PawnHead, pad_batch

# ---------------------------------------------------------------------------- training


def bce_smoothed(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """BCE with logits against y' = y·(1 - ε) + ε/2 (ε = 0.2: y' = 0.8·y + 0.1)."""
    return F.binary_cross_entropy_with_logits(logits, labels * (1.0 - smoothing) + smoothing / 2)


def _train_step(head: PawnHead, opt: torch.optim.Optimizer, batch: list[torch.Tensor], y: torch.Tensor,
                label_smoothing: float, max_grad_norm: float) -> tuple[float, int]:
    """One AdamW step on (metrics, hidden, mask); returns (loss, number of correct predictions)."""
    head.train()
    logits = head(*batch)
    loss = bce_smoothed(logits, y, label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(head.parameters(), max_grad_norm)
    opt.step()
    return loss.item(), int(((logits > 0).float() == y).sum())


def train_pawn(features: str | pa.Table, epochs: int = 5, lr: float = 1e-3, weight_decay: float = 0.01,
               batch_size: int = 16, max_tokens: int = 512, seed: int = 0, device: str | torch.device = "cpu",
               label_smoothing: float = 0.2, max_grad_norm: float = 1.0) -> tuple[PawnHead, list[dict]]:
    """Train a ``PawnHead`` on cached features; returns the head (in eval mode) and per-epoch history.

    BCE with logits, label smoothing 0.2, AdamW(lr, weight_decay), grad-norm clipping 1.0,
    documents truncated to ``max_tokens``. History rows: {"epoch", "loss", "accuracy"} measured on
    the training batches as they were trained (train mode). Seeded; global RNG state is restored.
    """
    metrics, hidden, labels = read_features(features)
    docs = [i for i, m in enumerate(metrics) if len(m)]
    if not docs:
        raise ValueError("no document with scored tokens in the feature cache")
    device = torch.device(device)
    config = PawnConfig(hidden_size=hidden[docs[0]].shape[1])
    history: list[dict] = []
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        head = PawnHead(config).to(device)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        order_gen = torch.Generator().manual_seed(seed)
        for epoch in range(1, epochs + 1):
            order = [docs[i] for i in torch.randperm(len(docs), generator=order_gen).tolist()]
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            loss_sum, correct = 0.0, 0
            for batch in batches:
                tensors = pad_batch([metrics[i] for i in batch], [hidden[i] for i in batch], max_tokens)
                y = torch.as_tensor(labels[batch], device=device)
                loss, n_correct = _train_step(head, opt, [t.to(device) for t in tensors], y,
                                              label_smoothing, max_grad_norm)
                loss_sum += loss * len(batch)
                correct += n_correct
            history.append({"epoch": epoch, "loss": loss_sum / len(docs), "accuracy": correct / len(docs)})
    head.eval()
    return head, history
