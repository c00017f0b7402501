"""Reading and writing SAEs: the sparsify and SAELens layouts, from a path or an fsspec URL."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file, save_file

from operators import cache as model_cache
from operators.sae.model import Activation, SAEConfig, SparseAutoencoder

# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------

_SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
_SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _exists(url: str, name: str) -> bool:
    fs, root = fsspec.core.url_to_fs(_join(url, name))
    return fs.exists(root)


def _localize(url: str, names: Sequence[str], cache: str | os.PathLike | None) -> Path:
    """A local directory holding ``names`` from ``url``: the directory itself when local,
    else a cache copy keyed by sha256(url) (each file via a temp file and atomic rename)."""
    fs, root = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return Path(root)
    local = model_cache.cache_dir("sae", cache) / model_cache.url_key(url)
    for name in names:
        model_cache.fetch_atomic(fs, _join(root, name), local / name)
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


def sparsify_hookpoint(layer: int | str) -> str:
    """The sparsify directory name for HF ``hidden_states`` index ``layer`` (a string is a hookpoint name).

    sparsify's trainer hooks the *output* of decoder block i and saves it as ``layers.i``: that is
    HF ``hidden_states[i + 1]``. So HF index L ↔ ``layers.{L-1}``; L = 0 (the embeddings) has no
    ``layers.*`` directory. (The last block's output, ``layers.{n-1}``, is taken before the model's
    final norm, unlike HF ``hidden_states[n]``: the SAE head refuses that layer.)
    """
    if not isinstance(layer, int):
        return layer
    if layer < 1:
        raise ValueError(f"layer {layer}: sparsify's layers.<i> is the output of block i = HF hidden_states[i+1], "
                         "so the HF index must be ≥ 1")
    return f"layers.{layer - 1}"


def saelens_hf_layer(hook_name: str | None) -> int | None:
    """HF ``hidden_states`` index of a SAELens residual hook: ``blocks.{i}.hook_resid_post`` = i + 1,
    ``blocks.{i}.hook_resid_pre`` = i; None for any other hook (or none)."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name or "")
    if m is None:
        return None
    return int(m.group(1)) + (1 if m.group(2) == "post" else 0)


def load_sparsify(
    dir_or_url: str | os.PathLike, layer: int | str | None = None, cache_dir: str | os.PathLike | None = None
) -> SparseAutoencoder:
    """Load an EleutherAI ``sparsify`` TopK SAE.

    Layout: ``<dir>/layers.<layer-1>/{cfg.json, sae.safetensors}`` for HF ``hidden_states`` index
    ``layer`` (see ``sparsify_hookpoint``; ``layer`` may also be a full hookpoint name such as
    ``"layers.6.mlp"``), or ``<dir>/{cfg.json, sae.safetensors}`` when
    ``layer`` is None. Tensors: ``encoder.weight`` [d_sae, d_in], ``encoder.bias`` [d_sae],
    ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]; ``W_skip`` (skip connections) is ignored, so
    ``decode`` omits the skip term. cfg: ``k``; ``d_in`` (else taken from ``b_dec``); d_sae is
    ``num_latents`` if set, else ``expansion_factor · d_in`` if set, else taken from
    ``encoder.weight``. Transcoders (``transcode: true``) do not subtract b_dec.
    """
    url = os.fspath(dir_or_url)
    if layer is not None:
        url = _join(url, sparsify_hookpoint(layer))
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
    """Write a TopK SAE in the ``sparsify`` layout so that ``load_sparsify`` and sparsify itself can
    read it: ``<out_dir>/layers.<layer-1>/`` for an SAE on HF ``hidden_states[layer]`` (sparsify names
    a block's output by the block, see ``sparsify_hookpoint``), or ``out_dir`` when layer is None."""
    cfg = sae.cfg
    if cfg.activation != "topk":
        raise ValueError(f"the sparsify layout holds TopK SAEs only, not {cfg.activation!r}")
    path = Path(out_dir) if layer is None else Path(out_dir) / sparsify_hookpoint(layer)
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
    present, else sparsify (``layer``, an HF ``hidden_states`` index, picks ``layers.<layer-1>`` in a
    multi-layer directory)."""
    url = os.fspath(path)
    if layer is None and _exists(url, "sae_weights.safetensors"):
        return load_saelens(url, cache_dir)
    if layer is not None and _exists(_join(url, sparsify_hookpoint(layer)), "sae_weights.safetensors"):
        return load_saelens(_join(url, sparsify_hookpoint(layer)), cache_dir)
    return load_sparsify(url, layer, cache_dir)
