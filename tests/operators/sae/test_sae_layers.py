"""The SAE layer index (sparsify ``layers.i`` = output of block i = HF hidden_states[i+1]) and MoNA's
pooling over all n tokens, on a tiny random Llama through the torch engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_sae as shared_random_sae

from operators.lm.heads import ModelInfo
from operators.lm.models import ModelSpec
from operators.lm.torch_engine import TorchEngine
from operators.sae.head import build_head, idx_column, val_column
from operators.sae.io import load_sae, save_sparsify
from operators.sae.model import SparseAutoencoder
from tests.operators.lm.tiny_lm import HIDDEN, N_LAYERS, TEXT, build_tiny_lm


def random_sae(d_in: int, seed: int = 0) -> SparseAutoencoder:
    """conftest's random SAE at this module's size (48 latents, k = 6, a random encoder bias)."""
    return shared_random_sae(d_in, d_sae=48, k=6, seed=seed, bias_std=0.1)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    path = build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))
    return TorchEngine(ModelSpec(name="tiny", path=str(path)), max_tokens=64)


def dense(heads: dict, name: str, d_sae: int) -> np.ndarray:
    out = np.zeros(d_sae, np.float32)
    out[np.asarray(heads[idx_column(name)], dtype=np.int64)] = heads[val_column(name)]
    return out


def block_output(engine: TorchEngine, block: int, ids: list[int]) -> torch.Tensor:
    """What sparsify's trainer sees for hookpoint ``layers.<block>``: a forward hook on that module
    of ``model.base_model``, output[0] when the block returns a tuple. [n, H]"""
    seen = {}

    def hook(_module, _args, output):
        seen["x"] = output[0] if isinstance(output, tuple) else output

    handle = engine.model.base_model.get_submodule(f"layers.{block}").register_forward_hook(hook)
    try:
        with torch.inference_mode():
            engine.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["x"][0].float()


@pytest.mark.parametrize("block", [0, 2])
def test_sparsify_layers_i_reads_the_output_of_block_i(engine, tmp_path, block):
    """An SAE saved the way sparsify saves hookpoint ``layers.<block>`` (next to a decoy at
    ``layers.<block+1>``) is fed, for HF index block + 1, exactly the tensor a forward hook on that
    block sees: the head's code equals the mean over all n tokens of SAE.encode(hooked output)."""
    root = tmp_path / "sae"
    sae = random_sae(HIDDEN, seed=1)
    save_sparsify(sae, root / f"layers.{block}")              # flat write into sparsify's dir name
    save_sparsify(random_sae(HIDDEN, seed=2), root / f"layers.{block + 1}")  # decoy
    doc = engine.encode([TEXT])
    ids = doc[0].ids
    expected = sae.encode(block_output(engine, block, ids)).mean(0).numpy()  # all n tokens
    head = build_head({"sae": str(root), "layer": block + 1, "skip_first": 0}, engine.model_info())
    engine.add_taps(set(head.layers))
    got = dense(engine.score(doc, [head])[0].heads, "sae", sae.cfg.d_sae)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_save_writes_layers_L_minus_1_and_round_trips(tmp_path):
    sae = random_sae(HIDDEN)
    path = save_sparsify(sae, tmp_path / "sae", layer=3)
    assert path.name == "layers.2"  # HF hidden_states[3] = output of block 2
    back = load_sae(tmp_path / "sae", layer=3)
    torch.testing.assert_close(back.W_enc, sae.W_enc)
    with pytest.raises(ValueError, match="≥ 1"):
        save_sparsify(sae, tmp_path / "sae", layer=0)


def test_saelens_hook_names_map_to_hf_indices(tmp_path):
    from operators.sae.io import saelens_hf_layer

    assert saelens_hf_layer("blocks.4.hook_resid_post") == 5
    assert saelens_hf_layer("blocks.4.hook_resid_pre") == 4
    assert saelens_hf_layer("blocks.4.hook_mlp_out") is None
    sae = random_sae(HIDDEN)
    d = tmp_path / "lens"
    d.mkdir()
    from safetensors.torch import save_file

    save_file({"W_enc": sae.W_enc.contiguous(), "b_enc": sae.b_enc, "W_dec": sae.W_dec.contiguous(),
               "b_dec": sae.b_dec}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"d_in": HIDDEN, "d_sae": 48, "architecture": "standard",
                                            "hook_name": "blocks.1.hook_resid_post"}))
    info = ModelInfo("tiny", HIDDEN, N_LAYERS, 32, "cpu", torch.float32)
    assert build_head({"sae": str(d), "layer": 2}, info).layers == [2]
    with pytest.raises(ValueError, match=r"hidden_states\[2\], but the head asks for layer 1"):
        build_head({"sae": str(d), "layer": 1}, info)


def test_layers_outside_the_model_and_the_normed_last_layer_are_clear_errors(tmp_path):
    root = tmp_path / "sae"
    save_sparsify(random_sae(HIDDEN), root, layer=N_LAYERS)  # layers.3: the last block, before the norm
    info = ModelInfo("tiny", HIDDEN, N_LAYERS, 32, "cpu", torch.float32)
    with pytest.raises(ValueError, match="after the final norm"):
        build_head({"sae": str(root), "layer": N_LAYERS}, info)
    with pytest.raises(ValueError, match="outside model 'tiny'"):
        build_head({"sae": str(root), "layer": N_LAYERS + 3}, info)


def test_mona_pools_all_n_tokens_by_hand(engine, tmp_path):
    """e = mean over t = skip_first … n-1 of SAE.encode(hidden_states[L][t]), the last token included."""
    layer = 2
    sae = random_sae(HIDDEN, seed=3)
    save_sparsify(sae, tmp_path / "sae", layer=layer)
    doc = engine.encode([TEXT])
    with torch.inference_mode():
        hs = engine.model(input_ids=torch.tensor([doc[0].ids]), output_hidden_states=True).hidden_states
    n = len(doc[0].ids)
    codes = sae.encode(hs[layer][0].float())  # [n, d_sae]
    expected = sum(codes[t] for t in range(1, n)) / (n - 1)
    head = build_head({"sae": str(tmp_path / "sae"), "layer": layer, "skip_first": 1}, engine.model_info())
    engine.add_taps(set(head.layers))
    got = dense(engine.score(doc, [head])[0].heads, "sae", sae.cfg.d_sae)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_mona_default_pools_every_token_as_eq_7(engine, tmp_path):
    """By default e = (1/n) Σ_{t=0}^{n-1} SAE.encode(h_t): MoNA's Eq. 7 averages all n tokens, x_0 too."""
    layer = 2
    sae = random_sae(HIDDEN, seed=4)
    save_sparsify(sae, tmp_path / "sae", layer=layer)
    doc = engine.encode([TEXT])
    with torch.inference_mode():
        hs = engine.model(input_ids=torch.tensor([doc[0].ids]), output_hidden_states=True).hidden_states
    expected = sae.encode(hs[layer][0].float()).mean(dim=0)  # [d_sae], all n rows
    head = build_head({"sae": str(tmp_path / "sae"), "layer": layer}, engine.model_info())
    assert head.params.skip_first == 0
    engine.add_taps(set(head.layers))
    got = dense(engine.score(doc, [head])[0].heads, "sae", sae.cfg.d_sae)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_sae_select_tokenizes_its_targets_as_the_lm_stage_does(tmp_path, one_torch_thread):
    """score_first_token (a context token where the tokenizer adds none) reaches the target's engine:
    a target text equal to a document gets the document's very embedding (J = 1 to its nearest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.lm.stage import LMStageConfig
    from operators.sae.stage import SAESelectConfig

    model = build_tiny_lm(tmp_path / "lm")  # its tokenizer adds no BOS
    save_sparsify(random_sae(HIDDEN, seed=5), tmp_path / "sae", layer=2)
    lm = LMStageConfig(model={"name": "tiny", "path": str(model)}, max_tokens=32, score_first_token=True,
                       metrics=["logprob"], heads=[{"kind": "sae", "params": {"sae": str(tmp_path / "sae"), "layer": 2}}])
    texts = ["the cat sat on the mat", "a dog is in the world"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "target.parquet")
    docs = lm.build().process(pa.table({"text": texts}))
    assert docs.column("tiny__token_ids").to_pylist()[0][0] == 1  # <s> in front
    select = SAESelectConfig(target=str(tmp_path / "target.parquet"), lm=lm.stage_name, aggregate="max").bind([lm])
    scores = select.build().process(docs).column(select.score_column).to_pylist()
    assert scores == pytest.approx([1.0, 1.0], abs=1e-6)
