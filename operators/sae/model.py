"""Sparse-autoencoder codes for task-specific data selection (MoNA-style).

Ma et al., "Task-Specific Data Selection for Instruction Tuning via Monosemantic Neuronal
Activations": encode a model's hidden states with a sparse autoencoder (SAE), mean-pool the
codes over a sample's tokens, and rank candidate samples by their generalized Jaccard
similarity to the mean code (prototype) of the target-task samples:

    e(x)        = (1 / |T|) Σ_{t ∈ T} z_t                       sample embedding
    proto       = (1 / |X_target|) Σ_{x ∈ X_target} e(x)
    J(a, b)     = Σ_k min(a_k, b_k) / Σ_k max(a_k, b_k)          a, b ≥ 0

Two SAE families are read:

* TopK, EleutherAI ``sparsify`` (Gao et al., "Scaling and Evaluating Sparse Autoencoders"):
  z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc))
* ReLU / JumpReLU, ``SAELens`` (Rajamanoharan et al., "Jumping Ahead: Improving
  Reconstruction Fidelity with JumpReLU Sparse Autoencoders"):
  pre = (x − b_dec · apply_b_dec_to_input) W_enc + b_enc,  z = ReLU(pre) [· 1(pre > θ)]

All decode with x̂ = z W_dec + b_dec. Weights are held in one layout (W_enc [d_in, d_sae],
W_dec [d_sae, d_in]); loaders convert and check every shape at load time.

Module order: the model; loaders and ``save_sparsify``; pooling and sparse storage;
generalized Jaccard; a minimal TopK trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file, save_file
from torch import nn

Activation = Literal["topk", "relu", "jumprelu"]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEConfig:
    """Architecture of a ``SparseAutoencoder`` (what the loaders read from cfg.json)."""

    d_in: int
    d_sae: int
    activation: Activation = "topk"
    k: int | None = None  # TopK only: latents kept per token
    apply_b_dec_to_input: bool = True  # subtract b_dec before the encoder


class SparseAutoencoder(nn.Module):
    """z = act(pre), pre = (x − b_dec·apply_b_dec_to_input) W_enc + b_enc; x̂ = z W_dec + b_dec."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.activation not in ("topk", "relu", "jumprelu"):
            raise ValueError(f"unknown activation {cfg.activation!r}")
        if cfg.activation == "topk" and not (cfg.k and 0 < cfg.k <= cfg.d_sae):
            raise ValueError(f"TopK needs 0 < k <= d_sae = {cfg.d_sae}, got k = {cfg.k}")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))  # [d_sae]
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))  # [d_sae, d_in], row = latent direction
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))  # [d_in]
        threshold = torch.zeros(cfg.d_sae) if cfg.activation == "jumprelu" else None
        self.register_buffer("threshold", threshold)  # [d_sae] JumpReLU θ, else None

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)  # [..., d_in]
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc  # [..., d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> z [..., d_sae] (non-negative)."""
        pre = self.pre_acts(x)  # [..., d_sae]
        if self.cfg.activation == "topk":
            vals, idx = pre.relu().topk(self.cfg.k, dim=-1)  # [..., k]
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        if self.cfg.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d_sae] -> x̂ [..., d_in]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------

_SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
_SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("CURATE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "curate")
    return Path(root) / "sae"


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _exists(url: str, name: str) -> bool:
    fs, root = fsspec.core.url_to_fs(_join(url, name))
    return fs.exists(root)


def _localize(url: str, names: Sequence[str], cache_dir: str | os.PathLike | None) -> Path:
    """A local directory holding ``names`` from ``url``: the directory itself when local,
    else a cache copy keyed by sha256(url) (each file via a temp file and atomic rename)."""
    fs, root = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return Path(root)
    local = _cache_root(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = local / name
        if target.exists():
            continue
        fd, tmp = tempfile.mkstemp(dir=local, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst, fs.open(_join(root, name), "rb") as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return local


def _read_cfg(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], file: Path) -> torch.Tensor:
    """tensors[key] as float32, or a ValueError naming the file and the expected shape."""
    if key not in tensors:
        raise ValueError(f"{file}: missing tensor {key!r} (expected shape {list(shape)})")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"{file}: tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t.to(torch.float32)


def _shape_of(tensors: dict[str, torch.Tensor], key: str, file: Path) -> tuple[int, ...]:
    if key not in tensors:
        raise ValueError(f"{file}: missing tensor {key!r}")
    return tuple(tensors[key].shape)


def _build(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None) -> SparseAutoencoder:
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if threshold is not None:
            sae.threshold.copy_(threshold)
    return sae.requires_grad_(False).eval()  # loaded SAEs are for inference


def _layer_name(layer: int | str) -> str:
    return f"layers.{layer}" if isinstance(layer, int) else layer


def load_sparsify(
    dir_or_url: str | os.PathLike, layer: int | str | None = None, cache_dir: str | os.PathLike | None = None
) -> SparseAutoencoder:
    """Load an EleutherAI ``sparsify`` TopK SAE.

    Layout: ``<dir>/layers.<layer>/{cfg.json, sae.safetensors}`` (``layer`` may also be a full
    hookpoint name such as ``"layers.6.mlp"``), or ``<dir>/{cfg.json, sae.safetensors}`` when
    ``layer`` is None. Tensors: ``encoder.weight`` [d_sae, d_in], ``encoder.bias`` [d_sae],
    ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]; ``W_skip`` (skip connections) is ignored, so
    ``decode`` omits the skip term. cfg: ``k``; ``d_in`` (else taken from ``b_dec``); d_sae is
    ``num_latents`` if set, else ``expansion_factor · d_in`` if set, else taken from
    ``encoder.weight``. Transcoders (``transcode: true``) do not subtract b_dec.
    """
    url = os.fspath(dir_or_url)
    if layer is not None:
        url = _join(url, _layer_name(layer))
    elif not all(_exists(url, name) for name in _SPARSIFY_FILES):
        raise FileNotFoundError(f"{url} holds no cfg.json + sae.safetensors; pass layer= to pick layers.<N>")
    local = _localize(url, _SPARSIFY_FILES, cache_dir)
    cfg = _read_cfg(local / "cfg.json")
    file = local / "sae.safetensors"
    tensors = load_file(str(file))

    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{local / 'cfg.json'}: activation {cfg['activation']!r} is not supported (topk only)")
    if "k" not in cfg:
        raise ValueError(f"{local / 'cfg.json'}: missing 'k'")
    d_in = int(cfg["d_in"]) if "d_in" in cfg else _shape_of(tensors, "b_dec", file)[0]
    if cfg.get("num_latents"):
        d_sae = int(cfg["num_latents"])
    elif cfg.get("expansion_factor"):
        d_sae = int(cfg["expansion_factor"]) * d_in
    else:
        d_sae = _shape_of(tensors, "encoder.weight", file)[0]

    sae_cfg = SAEConfig(d_in, d_sae, "topk", int(cfg["k"]), apply_b_dec_to_input=not cfg.get("transcode", False))
    return _build(
        sae_cfg,
        W_enc=_take(tensors, "encoder.weight", (d_sae, d_in), file).T,
        b_enc=_take(tensors, "encoder.bias", (d_sae,), file),
        W_dec=_take(tensors, "W_dec", (d_sae, d_in), file),
        b_dec=_take(tensors, "b_dec", (d_in,), file),
    )


def save_sparsify(sae: SparseAutoencoder, out_dir: str | os.PathLike, layer: int | str | None = None) -> Path:
    """Write a TopK SAE in the ``sparsify`` layout (``<out_dir>/layers.<layer>/`` or ``out_dir``
    when layer is None) so that ``load_sparsify`` and sparsify itself can read it."""
    cfg = sae.cfg
    if cfg.activation != "topk":
        raise ValueError(f"the sparsify layout holds TopK SAEs only, not {cfg.activation!r}")
    path = Path(out_dir) if layer is None else Path(out_dir) / _layer_name(layer)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": sae.W_enc.detach().T.contiguous().cpu(),  # [d_sae, d_in]
        "encoder.bias": sae.b_enc.detach().contiguous().cpu(),  # [d_sae]
        "W_dec": sae.W_dec.detach().contiguous().cpu(),  # [d_sae, d_in]
        "b_dec": sae.b_dec.detach().contiguous().cpu(),  # [d_in]
    }
    save_file(tensors, str(path / "sae.safetensors"))
    meta = {
        "expansion_factor": cfg.d_sae // cfg.d_in if cfg.d_sae % cfg.d_in == 0 else 0,
        "normalize_decoder": True,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": not cfg.apply_b_dec_to_input,
        "activation": "topk",
        "d_in": cfg.d_in,
    }
    with open(path / "cfg.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return path


def _saelens_activation(cfg: dict, tensors: dict, cfg_file: Path) -> tuple[Activation, int | None]:
    """(activation, k) from the SAELens cfg fields of v3–v6 (``architecture``, ``activation_fn``,
    ``activation_fn_str``, ``activation_fn_kwargs``, ``k``)."""
    arch = str(cfg.get("architecture") or "").lower()
    fn = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "").lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k"))
    if arch == "jumprelu" or (not arch and ("threshold" in tensors or "log_threshold" in tensors)):
        return "jumprelu", None
    if arch == "topk" or fn == "topk":
        if k is None:
            raise ValueError(f"{cfg_file}: TopK SAE without 'k'")
        return "topk", int(k)
    if arch in ("", "standard") and fn in ("", "relu"):
        return "relu", None
    raise ValueError(f"{cfg_file}: unsupported SAELens architecture {arch!r} / activation {fn!r}")


def load_saelens(dir_or_url: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> SparseAutoencoder:
    """Load a SAELens SAE: ``cfg.json`` + ``sae_weights.safetensors``.

    Tensors: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec``
    [d_in]; JumpReLU also ``threshold`` [d_sae] (or ``log_threshold``, θ = exp). cfg: ``d_in``
    and ``d_sae`` (else taken from ``W_enc``), ``apply_b_dec_to_input`` (default true) and
    the architecture fields; input normalisation other than none is refused.
    """
    local = _localize(os.fspath(dir_or_url), _SAELENS_FILES, cache_dir)
    cfg_file, file = local / "cfg.json", local / "sae_weights.safetensors"
    cfg = _read_cfg(cfg_file)
    tensors = load_file(str(file))

    norm = cfg.get("normalize_activations")
    if norm not in (None, "none"):
        raise ValueError(f"{cfg_file}: normalize_activations={norm!r} is not supported")
    activation, k = _saelens_activation(cfg, tensors, cfg_file)
    d_in = int(cfg["d_in"]) if cfg.get("d_in") else _shape_of(tensors, "W_enc", file)[0]
    d_sae = int(cfg["d_sae"]) if cfg.get("d_sae") else _shape_of(tensors, "W_enc", file)[-1]

    threshold = None
    if activation == "jumprelu":
        if "threshold" in tensors:
            threshold = _take(tensors, "threshold", (d_sae,), file)
        else:
            threshold = _take(tensors, "log_threshold", (d_sae,), file).exp()
    sae_cfg = SAEConfig(d_in, d_sae, activation, k, bool(cfg.get("apply_b_dec_to_input", True)))
    return _build(
        sae_cfg,
        W_enc=_take(tensors, "W_enc", (d_in, d_sae), file),
        b_enc=_take(tensors, "b_enc", (d_sae,), file),
        W_dec=_take(tensors, "W_dec", (d_sae, d_in), file),
        b_dec=_take(tensors, "b_dec", (d_in,), file),
        threshold=threshold,
    )


def load_sae(
    path: str | os.PathLike, layer: int | str | None = None, cache_dir: str | os.PathLike | None = None
) -> SparseAutoencoder:
    """Load whichever layout ``path`` holds: SAELens when ``sae_weights.safetensors`` is
    present, else sparsify (``layer`` picks ``layers.<layer>`` in a multi-layer directory)."""
    url = os.fspath(path)
    if layer is None and _exists(url, "sae_weights.safetensors"):
        return load_saelens(url, cache_dir)
    if layer is not None and _exists(_join(url, _layer_name(layer)), "sae_weights.safetensors"):
        return load_saelens(_join(url, _layer_name(layer)), cache_dir)
    return load_sparsify(url, layer, cache_dir)


# ---------------------------------------------------------------------------------------------
# Sample embeddings and sparse storage
# ---------------------------------------------------------------------------------------------


def mean_pooled_code(z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """e = Σ_t m_t z_t / Σ_t m_t over the token axis.

    z: [..., T, d_sae]; mask: [..., T] (bool or 0/1; None = all tokens). Returns [..., d_sae];
    a sample with no unmasked token gets the zero vector.
    """
    if mask is None:
        return z.mean(dim=-2)
    m = mask.to(z.dtype)  # [..., T]
    total = (z * m.unsqueeze(-1)).sum(dim=-2)  # [..., d_sae]
    return total / m.sum(dim=-1, keepdim=True).clamp(min=1.0)


def to_sparse(vec: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """1-D dense vector -> (indices int32 ascending, values float32) of its non-zeros."""
    if isinstance(vec, torch.Tensor):
        vec = vec.detach().cpu().numpy()
    vec = np.asarray(vec)
    if vec.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {vec.shape}")
    idx = np.flatnonzero(vec)
    return idx.astype(np.int32), vec[idx].astype(np.float32)


def from_sparse(indices: np.ndarray, values: np.ndarray, d_sae: int) -> np.ndarray:
    """(indices, values) -> dense float32 [d_sae]."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.shape != np.shape(values):
        raise ValueError(f"indices {indices.shape} and values {np.shape(values)} differ in shape")
    if indices.size and (indices.min() < 0 or indices.max() >= d_sae):
        raise ValueError(f"indices must lie in [0, {d_sae})")
    out = np.zeros(d_sae, dtype=np.float32)
    out[indices] = values
    return out


def prototype(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """proto = (1 / n) Σ_i e_i over target embeddings [n, d_sae] -> float64 [d_sae]."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"expected non-empty embeddings [n, d_sae], got shape {emb.shape}")
    return emb.mean(axis=0)


# ---------------------------------------------------------------------------------------------
# Generalized Jaccard
# ---------------------------------------------------------------------------------------------


def generalized_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """J(a, b) = Σ_k min(a_k, b_k) / Σ_k max(a_k, b_k) for non-negative a, b; 0/0 -> 0.0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if (a < 0).any() or (b < 0).any():
        raise ValueError("generalized Jaccard needs non-negative vectors")
    den = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / den) if den > 0 else 0.0


def generalized_jaccard_many(
    indices: Sequence[np.ndarray], values: Sequence[np.ndarray], proto: np.ndarray
) -> np.ndarray:
    """J(row_r, proto) for sparse rows (indices[r], values[r]) against a dense prototype.

    Only the row's support S_r is visited:
        Σ_k min = Σ_{k∈S_r} min(v_k, p_k)
        Σ_k max = Σ_{k∈S_r} max(v_k, p_k) + Σ_{k∉S_r} p_k = Σ_k p_k + Σ_{k∈S_r} max(v_k − p_k, 0)
    (prototype mass outside the support counts in the denominator). Indices within a row
    must be unique; 0/0 -> 0.0. Returns float64 [R].
    """
    if len(indices) != len(values):
        raise ValueError(f"{len(indices)} index rows but {len(values)} value rows")
    p = np.asarray(proto, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any():
        raise ValueError("the prototype must be a non-negative 1-D vector")
    n_rows = len(indices)
    if n_rows == 0:
        return np.empty(0, dtype=np.float64)
    lengths = np.array([len(i) for i in indices])
    idx = np.concatenate([np.asarray(i, dtype=np.int64) for i in indices])
    val = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
    if idx.shape != val.shape or not np.array_equal(lengths, [len(v) for v in values]):
        raise ValueError("every index row needs a value row of the same length")
    if (val < 0).any():
        raise ValueError("generalized Jaccard needs non-negative vectors")
    row = np.repeat(np.arange(n_rows), lengths)  # [nnz] row of each entry
    p_at = p[idx]  # [nnz]
    num = np.bincount(row, weights=np.minimum(val, p_at), minlength=n_rows)
    den = p.sum() + np.bincount(row, weights=np.maximum(val - p_at, 0.0), minlength=n_rows)
    return np.divide(num, den, out=np.zeros(n_rows), where=den > 0)


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
