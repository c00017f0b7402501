"""Training a TopK SAE on LM activations with sparsify's SparseCoder."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import torch

from operators.sae.io import load_sparsify
from operators.sae.model import SparseAutoencoder

# ---------------------------------------------------------------------------------------------
# Minimal TopK trainer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainStats:
    """Held-out quality of a trained SAE.

    fvu = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the held-out split; dead_fraction = share of
    latents never active on any held-out row (an over-estimate when the split is small).
    """

    fvu: float
    dead_fraction: float
    n_train: int
    n_valid: int


def train_topk_sae(
    activations: torch.Tensor,
    d_sae: int,
    k: int,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    valid_fraction: float = 0.1,
    auxk_alpha: float = 1 / 32,
) -> tuple[SparseAutoencoder, TrainStats]:
    """Train a TopK SAE (Gao et al. 2024) on activations [N, d_in] with EleutherAI sparsify.

    The module, its initialisation (encoder = decoder transpose, unit-norm decoder rows), the TopK
    encoder and the loss are sparsify's ``SparseCoder``: loss = FVU + auxk_alpha · AuxK, where AuxK
    lets the latents that fired on none of the last epoch's rows predict the residual (the paper's
    fix for dead latents). After each Adam step the gradient parallel to the decoder rows is
    removed and the rows are renormalised, as sparsify's trainer does. The loop is ours because the
    activations come from the LM engine (sparsify's trainer runs its own model over a HF dataset);
    b_dec starts at the data mean. The result is saved by sparsify and read back with
    ``load_sparsify``, so the returned SAE is exactly what the sparsify layout holds.
    """
    if not torch.cuda.is_available():  # sparsify's Triton decoder needs a GPU; its eager one is exact
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    x = activations.detach().to(torch.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected activations [N >= 2, d_in], got shape {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_valid = max(1, round(valid_fraction * x.shape[0]))
    valid, train = x[perm[:n_valid]], x[perm[n_valid:]]

    torch.manual_seed(seed)  # SparseCoder draws its initial weights from the global generator
    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k))
    with torch.no_grad():
        coder.b_dec.copy_(train.mean(dim=0))
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    rows_since_fired = torch.zeros(d_sae, dtype=torch.long)

    coder.train()
    for _ in range(epochs):
        for batch in train[torch.randperm(train.shape[0], generator=gen)].split(batch_size):
            dead = rows_since_fired >= train.shape[0] if auxk_alpha > 0 else None
            out = coder(batch, dead_mask=dead)
            loss = out.fvu + auxk_alpha * out.auxk_loss
            opt.zero_grad(set_to_none=False)
            loss.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            coder.set_decoder_norm_to_unit_norm()
            rows_since_fired += batch.shape[0]
            rows_since_fired[out.latent_indices.flatten().unique()] = 0
    coder.eval()

    with tempfile.TemporaryDirectory(prefix="curate-sae-") as tmp:
        coder.save_to_disk(tmp)
        sae = load_sparsify(tmp)
    with torch.no_grad():
        z = sae.encode(valid)  # [n_valid, d_sae]
        err = (valid - sae.decode(z)).pow(2).sum()
        var = (valid - valid.mean(dim=0)).pow(2).sum()
        fvu = float(err / var) if var > 0 else math.nan
        dead = float((~(z > 0).any(dim=0)).float().mean())
    return sae, TrainStats(fvu, dead, train.shape[0], n_valid)
