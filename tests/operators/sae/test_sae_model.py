"""SAE codes and generalized Jaccard (operators/sae/model.py): expectations worked out by hand."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import save_file

from operators.sae.io import load_sae, load_saelens, load_sparsify, save_sparsify
from operators.sae.math import (
    from_sparse,
    generalized_jaccard,
    generalized_jaccard_many,
    mean_pooled_code,
    prototype,
    to_sparse,
)
from operators.sae.model import SAEConfig, SparseAutoencoder
from operators.sae.train import train_topk_sae

# Hand-built SAE: d_in = 2, d_sae = 3.
W_ENC = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # [d_in, d_sae]
B_ENC = torch.tensor([0.0, 0.5, 0.0])
W_DEC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # [d_sae, d_in]
B_DEC = torch.tensor([1.0, 0.0])
X = torch.tensor([[3.0, 1.0], [1.0, 3.0]])


def _sae(activation="topk", k=1, apply_b_dec=True, threshold=None) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(2, 3, activation, k, apply_b_dec))
    with torch.no_grad():
        sae.W_enc.copy_(W_ENC)
        sae.b_enc.copy_(B_ENC)
        sae.W_dec.copy_(W_DEC)
        sae.b_dec.copy_(B_DEC)
        if threshold is not None:
            sae.threshold.copy_(torch.tensor(threshold))
    return sae


# ---------------------------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------------------------


def test_topk_encode_decode_by_hand():
    # x − b_dec = [[2, 1], [0, 3]]
    # pre = (x − b_dec) W_enc + b_enc = [[2, 1, −1] + b_enc, [0, 3, 3] + b_enc] = [[2, 1.5, −1], [0, 3.5, 3]]
    # k = 1 keeps the largest ReLU'd pre-activation per row
    z = _sae(k=1).encode(X)
    torch.testing.assert_close(z, torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.5, 0.0]]))
    torch.testing.assert_close(_sae(k=2).encode(X), torch.tensor([[2.0, 1.5, 0.0], [0.0, 3.5, 3.0]]))
    # decode: z W_dec + b_dec = [2·[1,0] + [1,0], 3.5·[0,1] + [1,0]] = [[3, 0], [1, 3.5]]
    torch.testing.assert_close(_sae(k=1).decode(z), torch.tensor([[3.0, 0.0], [1.0, 3.5]]))
    assert _sae(k=1).encode(X[None]).shape == (1, 2, 3)  # leading batch dims pass through


def test_relu_and_jumprelu_by_hand():
    # no b_dec on input: pre = x W_enc + b_enc = [[3, 1, −2] + b_enc, [1, 3, 2] + b_enc]
    #                                          = [[3, 1.5, −2], [1, 3.5, 2]]
    relu = _sae("relu", k=None, apply_b_dec=False)
    torch.testing.assert_close(relu.encode(X), torch.tensor([[3.0, 1.5, 0.0], [1.0, 3.5, 2.0]]))
    # JumpReLU θ = [1, 2, 0]: keep pre where pre > θ (strict: row 1 latent 0 has pre == θ == 1 -> 0)
    jump = _sae("jumprelu", k=None, apply_b_dec=False, threshold=[1.0, 2.0, 0.0])
    torch.testing.assert_close(jump.encode(X), torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.5, 2.0]]))


def test_topk_config_checked():
    with pytest.raises(ValueError, match="k"):
        SparseAutoencoder(SAEConfig(2, 3, "topk", k=4))


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def test_sparsify_round_trip(tmp_path):
    sae = _sae(k=2)
    path = save_sparsify(sae, tmp_path, layer=3)
    assert path == tmp_path / "layers.2"  # HF hidden_states[3] = sparsify layers.2 (output of block 2)
    cfg = json.loads((path / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (2, 3, 2)

    for loaded in (load_sparsify(tmp_path, 3), load_sparsify(path), load_sae(tmp_path, layer=3)):
        assert loaded.cfg == sae.cfg
        torch.testing.assert_close(loaded.W_enc, W_ENC)
        torch.testing.assert_close(loaded.encode(X), torch.tensor([[2.0, 1.5, 0.0], [0.0, 3.5, 3.0]]))
    with pytest.raises(FileNotFoundError, match="layer"):
        load_sparsify(tmp_path)


def test_sparsify_from_memory_url(tmp_path):
    local = save_sparsify(_sae(k=1), tmp_path / "src", layer=1)  # sparsify layers.0
    mem = fsspec.filesystem("memory")
    for name in ("cfg.json", "sae.safetensors"):
        mem.pipe(f"/sae-test/layers.0/{name}", (local / name).read_bytes())
    try:
        sae = load_sparsify("memory://sae-test", 1, cache_dir=tmp_path / "cache")
        torch.testing.assert_close(sae.encode(X), torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.5, 0.0]]))
    finally:
        mem.rm("/sae-test", recursive=True)


def test_sparsify_expansion_factor_and_shape_error(tmp_path):
    # d_sae from expansion_factor · d_in = 2 · 2 = 4 (num_latents 0 = unset, as sparsify writes it)
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "num_latents": 0, "k": 1, "d_in": 2}))
    tensors = {"encoder.weight": torch.ones(4, 2), "encoder.bias": torch.zeros(4),
               "W_dec": torch.ones(4, 2), "b_dec": torch.zeros(2)}
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    assert load_sparsify(tmp_path).cfg.d_sae == 4

    tensors["encoder.weight"] = torch.ones(2, 4)  # transposed by mistake
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"sae\.safetensors.*'encoder\.weight'.*expected \[4, 2\]"):
        load_sparsify(tmp_path)


def _write_saelens(path, cfg: dict, tensors: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))


def test_saelens_jumprelu_layout(tmp_path):
    cfg = {"d_in": 2, "d_sae": 3, "architecture": "jumprelu", "apply_b_dec_to_input": False,
           "hook_name": "blocks.0.hook_resid_post", "normalize_activations": "none", "dtype": "float32"}
    tensors = {"W_enc": W_ENC, "b_enc": B_ENC, "W_dec": W_DEC, "b_dec": B_DEC,
               "threshold": torch.tensor([1.0, 2.0, 0.0])}
    _write_saelens(tmp_path, cfg, tensors)
    for sae in (load_saelens(tmp_path), load_sae(tmp_path)):
        assert sae.cfg.activation == "jumprelu"
        torch.testing.assert_close(sae.encode(X), torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.5, 2.0]]))


def test_saelens_standard_relu_older_cfg(tmp_path):
    cfg = {"d_in": 2, "d_sae": 3, "activation_fn_str": "relu", "apply_b_dec_to_input": True}
    _write_saelens(tmp_path, cfg, {"W_enc": W_ENC, "b_enc": B_ENC, "W_dec": W_DEC, "b_dec": B_DEC})
    sae = load_saelens(tmp_path)
    # x − b_dec = [[2, 1], [0, 3]] -> pre = [[2, 1.5, −1], [0, 3.5, 3]] -> ReLU
    torch.testing.assert_close(sae.encode(X), torch.tensor([[2.0, 1.5, 0.0], [0.0, 3.5, 3.0]]))


def test_saelens_shape_error_names_file_and_shape(tmp_path):
    cfg = {"d_in": 2, "d_sae": 3, "architecture": "standard"}
    _write_saelens(tmp_path, cfg, {"W_enc": W_ENC.T.contiguous(), "b_enc": B_ENC, "W_dec": W_DEC, "b_dec": B_DEC})
    with pytest.raises(ValueError) as err:
        load_saelens(tmp_path)
    assert str(tmp_path / "sae_weights.safetensors") in str(err.value)
    assert "'W_enc'" in str(err.value) and "expected [2, 3]" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Pooling, sparse storage, prototype
# ---------------------------------------------------------------------------------------------


def test_mean_pooled_code():
    z = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0], [100.0, 100.0, 100.0]])  # [T=3, d_sae=3]
    mask = torch.tensor([True, True, False])  # last token is padding
    # [(1+3)/2, 0, (2+0)/2]
    torch.testing.assert_close(mean_pooled_code(z, mask), torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(mean_pooled_code(z, torch.zeros(3, dtype=torch.bool)), torch.zeros(3))
    assert mean_pooled_code(torch.stack([z, z]), torch.stack([mask, mask])).shape == (2, 3)


def test_sparse_round_trip_and_prototype():
    idx, val = to_sparse(np.array([0.0, 1.5, 0.0, 2.0]))
    assert idx.dtype == np.int32 and val.dtype == np.float32
    assert idx.tolist() == [1, 3] and val.tolist() == [1.5, 2.0]
    assert to_sparse(torch.tensor([0.0, 0.5]))[0].tolist() == [1]
    assert from_sparse(idx, val, 4).tolist() == [0.0, 1.5, 0.0, 2.0]
    with pytest.raises(ValueError):
        from_sparse(np.array([4]), np.array([1.0]), 4)
    assert prototype(np.array([[1.0, 0.0], [3.0, 2.0]])).tolist() == [2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Generalized Jaccard
# ---------------------------------------------------------------------------------------------


def test_generalized_jaccard_by_hand():
    # Σ min = 0.5 + 0 + 2 = 2.5; Σ max = 1 + 1 + 2 = 4 -> 0.625
    assert generalized_jaccard(np.array([1.0, 0.0, 2.0]), np.array([0.5, 1.0, 2.0])) == pytest.approx(0.625)
    assert generalized_jaccard(np.zeros(3), np.zeros(3)) == 0.0  # 0/0 -> 0
    with pytest.raises(ValueError):
        generalized_jaccard(np.array([-1.0]), np.array([1.0]))


def test_generalized_jaccard_many_by_hand():
    proto = np.array([0.5, 1.0, 2.0, 0.5])  # Σ p = 4
    indices = [np.array([0, 2]), np.array([], dtype=np.int32), np.array([3])]
    values = [np.array([1.0, 2.0]), np.array([]), np.array([2.0])]
    # row 0 = [1, 0, 2, 0]: Σ min = 0.5 + 0 + 2 + 0 = 2.5; Σ max = 1 + 1 + 2 + 0.5 = 4.5 -> 5/9
    # row 1 = 0:            Σ min = 0;                   Σ max = Σ p = 4            -> 0
    # row 2 = [0, 0, 0, 2]: Σ min = 0.5;                 Σ max = 0.5 + 1 + 2 + 2 = 5.5 -> 1/11
    got = generalized_jaccard_many(indices, values, proto)
    np.testing.assert_allclose(got, [5 / 9, 0.0, 1 / 11])
    dense = [generalized_jaccard(from_sparse(i, v, 4), proto) for i, v in zip(indices, values, strict=True)]
    np.testing.assert_allclose(got, dense, rtol=1e-6)
    assert generalized_jaccard_many([], [], proto).shape == (0,)


_nonneg = st.floats(0.0, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(rows=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.just(8)), elements=_nonneg),
       proto=hnp.arrays(np.float64, 8, elements=_nonneg))
def test_jaccard_bounded_and_sparse_matches_dense(rows, proto):
    sparse = [to_sparse(r) for r in rows]
    many = generalized_jaccard_many([i for i, _ in sparse], [v for _, v in sparse], proto)
    dense = np.array([generalized_jaccard(r, proto) for r in rows])
    assert np.all(np.isfinite(many)) and np.all((many >= 0) & (many <= 1 + 1e-12))
    np.testing.assert_allclose(many, dense, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def test_train_topk_sae_on_sparse_data(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n, d_in, n_atoms = 2000, 16, 32
    atoms = torch.randn(n_atoms, d_in, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, n_atoms)  # 3 active atoms per row, coefficients in [0.5, 2.5]
    codes.scatter_(1, torch.randint(0, n_atoms, (n, 3), generator=gen), torch.rand(n, 3, generator=gen) * 2 + 0.5)
    x = codes @ atoms + 0.3

    sae, stats = train_topk_sae(x, d_sae=64, k=4, epochs=5, lr=1e-2, batch_size=128, seed=0)
    assert stats.fvu < 0.5
    assert 0.0 <= stats.dead_fraction <= 1.0 and stats.n_train + stats.n_valid == n
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert int((sae.encode(x[:10]) > 0).sum(dim=1).max()) <= 4

    loaded = load_sparsify(save_sparsify(sae, tmp_path, layer=1))
    torch.testing.assert_close(loaded.encode(x[:10]), sae.encode(x[:10]))
