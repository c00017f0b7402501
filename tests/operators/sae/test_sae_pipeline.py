"""SAE selection: the SAE head in the LM actor, the sae_select stage, and `curate sae train`.

Hand-checked math runs on tiny arrays; the pipeline test runs the demo model (SmolLM2-135M) with a
tiny random TopK SAE through the real pipeline on a local Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import random_sae
from pydantic import ValidationError

from operators.lm.head_specs import resolve_head_factory
from operators.lm.heads import ModelInfo
from operators.sae.head import build_head, mean_codes, pooled_mask
from operators.sae.head_params import SAEHeadParams
from operators.sae.io import load_sparsify, save_sparsify
from operators.sae.math import from_sparse, generalized_jaccard
from operators.sae.stage import SAESelectConfig, SAESimilarity
from operators.selection import TopPercentPolicy, select_documents, top_percent_mask
from pipelines.tables import read_table

torch.set_num_threads(1)
LAYER = 3
D_SAE, K = 64, 4


def info(hidden_size: int) -> ModelInfo:
    return ModelInfo("smol", hidden_size, 30, 49152, "cpu", torch.float32)


# ------------------------------------------------------------------ math on tiny arrays


def test_mean_codes_pool_only_masked_positions_after_skip_first():
    sae = random_sae(8, d_sae=16, k=3)
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    pooled = pooled_mask(mask, skip_first=1)
    assert pooled.tolist() == [[False, True, True, True, False], [False, True, False, False, False]]
    got = mean_codes(sae, h, pooled)
    z = sae.encode(h)
    torch.testing.assert_close(got[0], (z[0, 1] + z[0, 2] + z[0, 3]) / 3)
    torch.testing.assert_close(got[1], z[1, 1])
    empty = mean_codes(sae, h, torch.zeros(2, 5, dtype=torch.bool))  # nothing pooled: zeros
    assert empty.abs().sum() == 0


def test_mean_codes_in_chunks_equals_one_shot(monkeypatch):
    import operators.sae.head as sae_head

    sae, h, mask = random_sae(8, d_sae=16, k=3), torch.randn(3, 7, 8), torch.rand(3, 7) > 0.3
    whole = mean_codes(sae, h, mask)
    monkeypatch.setattr(sae_head, "CODE_BUFFER", 16 * 2)  # 2 rows per chunk
    torch.testing.assert_close(mean_codes(sae, h, mask), whole)


def test_similarity_by_hand_and_null_rows():
    # proto [1, 0, 2, 0]; row e = [2, 1, 0, 0]: Σmin = 1, Σmax = 2 + 1 + 2 = 5 -> 0.2
    op = SAESimilarity(np.array([1.0, 0.0, 2.0, 0.0]), "sae", "sae_similarity")
    batch = pa.table({"sae__sae_idx": pa.array([[0, 1], None, [2]], pa.list_(pa.int32())),
                      "sae__sae_val": pa.array([[2.0, 1.0], None, [2.0]], pa.list_(pa.float32()))})
    scores = op.process(batch).column("sae_similarity").to_pylist()
    assert scores[0] == pytest.approx(0.2) and scores[1] is None
    assert scores[2] == pytest.approx(2 / 3)  # Σmin = 2, Σmax = 1 + 2
    # aggregate max: refs proto and [2, 1, 0, 0]; row 0 equals the second ref: max(0.2, 1.0) = 1.0
    nearest = SAESimilarity(np.array([[1.0, 0.0, 2.0, 0.0], [2.0, 1.0, 0.0, 0.0]]), "sae", "s")
    assert nearest.process(batch).column("s").to_pylist()[0] == pytest.approx(1.0)
    too_wide = pa.table({"sae__sae_idx": pa.array([[7]], pa.list_(pa.int32())),
                         "sae__sae_val": pa.array([[1.0]], pa.list_(pa.float32()))})
    with pytest.raises(ValueError, match="d_sae = 4"):
        op.process(too_wide)


def test_top_percent_by_hand():
    # 3 scored rows, 50% -> ⌈1.5⌉ = 2: rows 1 (0.9) and 3 (0.5); NaN never kept
    assert top_percent_mask(np.array([0.1, 0.9, np.nan, 0.5]), 50).tolist() == [False, True, False, True]
    scores = np.linspace(0, 1, 40)
    assert top_percent_mask(scores, 5).sum() == 2  # 5% of 40 is exactly 2 (no float round-up to 3)
    assert top_percent_mask(np.append(scores, 0.5), 5).sum() == 3  # ⌈2.05⌉
    assert top_percent_mask(np.array([0.3, 0.3, 0.3]), 34).tolist() == [True, True, False]  # ties: first rows
    assert not top_percent_mask(np.array([np.nan]), 5).any()


def test_selected_table_is_the_top_5_percent_of_a_staged_run():
    ids = [f"d{i:02d}" for i in range(40)]
    scores = [(i * 7919 % 40) / 40 for i in range(40)]  # a permutation of 0, 1/40, …, 39/40
    docs = pl.LazyFrame({"id": ids, "text": ["x" * (i + 1) for i in range(40)], "sae_similarity": scores})
    table = select_documents(docs, "sae_similarity", "sae_select", TopPercentPolicy(percent=5)).to_pylist()
    best = sorted(zip(scores, ids, strict=True), reverse=True)[:2]
    assert [(r["id"], r["score"], r["rank"]) for r in table] == [(best[0][1], best[0][0], 1),
                                                                  (best[1][1], best[1][0], 2)]
    assert {r["operator"] for r in table} == {"sae_select"} and {r["policy"] for r in table} == {"top_percent(5)"}
    assert table[0]["n_chars"] == int(best[0][1][1:]) + 1  # len(text) when there is no n_chars column


# ------------------------------------------------------------------ loading and config errors


def test_d_in_mismatch_names_the_file_and_the_expected_shape(tmp_path):
    path = save_sparsify(random_sae(64), tmp_path / "sae", layer=LAYER)
    with pytest.raises(ValueError) as err:
        build_head({"sae": str(tmp_path / "sae"), "layer": LAYER}, info(576))
    msg = str(err.value)
    assert str(path / "sae.safetensors") in msg
    assert "d_in = 64" in msg and "hidden size 576" in msg and f"W_enc [576, {D_SAE}]" in msg


def test_head_params_and_missing_sae(tmp_path):
    with pytest.raises(ValidationError, match="layer"):
        SAEHeadParams.model_validate({"sae": "x"})
    with pytest.raises(FileNotFoundError, match="layers.2"):  # HF 3 = sparsify layers.2
        build_head({"sae": str(tmp_path / "none"), "layer": LAYER}, info(576))
    assert resolve_head_factory("sae") is build_head  # the short kind name
    flat = save_sparsify(random_sae(576), tmp_path / "flat")  # a flat dir works for any layer
    head = build_head({"sae": str(flat), "layer": 7, "name": "mona", "hidden_mean": True}, info(576))
    assert head.layers == [7] and head.output_schema().names == ["mona__sae_idx", "mona__sae_val",
                                                                  "mona__hidden_mean"]


# ------------------------------------------------------------------ the real pipeline on the demo model


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sae")
    save_sparsify(random_sae(576), out, layer=LAYER)
    return out


TOPICS = ["The cat sat on the mat and purred.", "def add(a, b):\n    return a + b",
          "Paris is the capital of France.", "Return the sorted list of keys in the mapping.",
          "It rained all day, so we stayed inside and read books."]


@pytest.mark.slow
def test_head_and_selection_through_the_pipeline(tmp_path, demo_model, tiny_sae, local_ray):
    from jobs.cli.main import main
    from operators.sae.embed import collect_activations, open_tap_engine
    from operators.sae.stage import read_texts

    # 40 documents + one of a single token, which the LM skips (null embedding, null score)
    texts = [f"{TOPICS[i % 5]} Note {i}: {'more words ' * (i % 4)}".strip() for i in range(40)] + ["Hello"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": [f"d{i:02d}" for i in range(41)], "text": texts}), corpus / "a.parquet")
    pq.write_table(pa.table({"text": TOPICS[:2]}), tmp_path / "target.parquet")
    model = {"name": "smol", "path": str(demo_model)}
    head = {"sae": str(tiny_sae), "layer": LAYER, "name": "sae", "hidden_mean": True}
    pipeline = {"name": "sae", "input": {"url": str(corpus)}, "output": {"url": str(tmp_path / "out")},
                "stages": [{"op": "lm", "model": model, "max_tokens": 32, "metrics": ["logprob"],
                            "keep_positions": False, "heads": [{"kind": "operators.sae.head:build_head", "params": head}],
                            "resources": {"batch_size": 64, "num_cpus": 0.75}},
                           {"op": "sae_select", "target": str(tmp_path / "target.parquet"), "lm": "lm_smol",
                            "resources": {"batch_size": 64, "num_cpus": 0.75}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    assert main(["run", str(tmp_path / "p.yaml"), "--date", "2026-03-04"]) == 0

    docs = read_table(str(tmp_path / "out" / "documents")).to_pandas().set_index("id").sort_index()
    assert docs.loc["d40", "sae__sae_idx"] is None and math.isnan(docs.loc["d40", "sae_similarity"])

    # consistent with a direct encode of the same states (layer 3, all n tokens: the head's default)
    sae = load_sparsify(tiny_sae, layer=LAYER)
    engine = open_tap_engine(str(demo_model), LAYER, max_tokens=32)
    for i in (0, 1, 7):
        h = collect_activations(engine, [texts[i]], LAYER, max_rows=10_000, skip_first=0)
        want = sae.encode(h).mean(0).numpy()
        row = docs.loc[f"d{i:02d}"]
        got = from_sparse(row["sae__sae_idx"], row["sae__sae_val"], D_SAE)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(row["sae__hidden_mean"], h.mean(0).numpy(), rtol=1e-3, atol=1e-3)
        assert list(row["sae__sae_idx"]) == sorted(row["sae__sae_idx"]) and (row["sae__sae_val"] > 0).all()

    # similarity = J(e_i, proto), proto = mean of the target embeddings
    proto = np.mean([sae.encode(collect_activations(engine, [t], LAYER, 10_000, skip_first=0)).mean(0).numpy()
                     for t in read_texts(str(tmp_path / "target.parquet"))], axis=0)
    for i in (0, 2, 9):
        row = docs.loc[f"d{i:02d}"]
        e = from_sparse(row["sae__sae_idx"], row["sae__sae_val"], D_SAE)
        assert row["sae_similarity"] == pytest.approx(generalized_jaccard(e, proto), rel=1e-3)

    # exactly the top 5% of the 40 scored documents: ⌈0.05 · 40⌉ = 2 (3 if the null counted)
    selected = read_table(str(tmp_path / "out" / "selected")).to_pylist()
    best = docs["sae_similarity"].dropna().sort_values(ascending=False, kind="stable")
    assert [r["id"] for r in selected] == list(best.index[:2])
    assert [r["rank"] for r in selected] == [1, 2]
    assert {(r["operator"], r["policy"]) for r in selected} == {("sae_select", "top_percent(5)")}


def test_sae_select_config_validation(tmp_path, demo_model):
    cfg = SAESelectConfig(target="t.parquet", lm="lm_smol")
    assert cfg.score_column == "sae_similarity" and cfg.policy.describe() == "top_percent(5)"
    named = SAESelectConfig(name="code", target="t", lm="lm_smol", top_percent=2.5)
    assert named.score_column == "code_similarity" and named.policy.describe() == "top_percent(2.5)"
    assert named.aggregate == "prototype"
    with pytest.raises(ValidationError, match="aggregate"):
        SAESelectConfig(target="t", lm="lm_smol", aggregate="mean")
    with pytest.raises(ValidationError, match="top_percent"):
        SAESelectConfig(target="t", lm="lm_smol", top_percent=0)


@pytest.mark.slow
def test_curate_sae_train_reports_fvu_and_dead_share(tmp_path, demo_model, capsys):
    from jobs.cli.main import main

    pq.write_table(pa.table({"text": [f"{t} Example {i}." for i in range(6) for t in TOPICS]}),
                   tmp_path / "corpus.parquet")
    argv = ["sae", "train", "--input", str(tmp_path / "corpus.parquet"), "--model", str(demo_model),
            "--layer", str(LAYER), "--output", str(tmp_path / "sae"), "--d-sae", "64", "--k", "4",
            "--epochs", "3", "--max-rows", "400", "--max-tokens", "24", "--batch-size", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out FVU" in out and "dead latents" in out
    stats = json.loads((tmp_path / "sae" / f"layers.{LAYER - 1}" / "train_stats.json").read_text())
    assert 0 < stats["fvu"] < 1.5 and 0 <= stats["dead_fraction"] <= 1
    assert stats["n_train"] + stats["n_valid"] <= 400
    sae = load_sparsify(tmp_path / "sae", layer=LAYER)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (576, 64, 4)
    assert main(["sae", "train", "--input", str(tmp_path / "nothing.parquet"), "--model", str(demo_model),
                 "--layer", "3", "--output", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
