"""precision@n and the selection baselines, by hand; the demo pool; an end-to-end eval on the demo model."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs.demo.selection import demo_pool_tables
from jobs.eval.selection import bm25_scores, cosine_to_mean, n_of, precision_at_n

torch.set_num_threads(1)


def test_precision_at_n_by_hand():
    scores, labels = np.array([0.9, 0.1, 0.8, 0.3]), np.array([1, 0, 0, 1])
    assert precision_at_n(scores, labels, 2) == 0.5  # top {0, 2}
    assert precision_at_n(scores, labels, 0.5) == 0.5  # ⌈0.5 · 4⌉ = 2
    assert precision_at_n(scores, labels, 3) == pytest.approx(2 / 3)  # top {0, 2, 3}
    assert precision_at_n(np.array([1.0, 1.0, 1.0, 0.0]), np.array([0, 1, 1, 0]), 1) == 0.0  # tie: row 0
    assert precision_at_n(np.array([np.nan, 0.2, 0.1]), np.array([1, 0, 1]), 2) == 0.5  # NaN last
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        precision_at_n(np.zeros(3), np.zeros(2), 1)


def test_n_of_fraction_and_count():
    assert n_of(0.05, 320) == 16 and n_of(0.05, 40) == 2 and n_of(0.05, 41) == 3
    assert n_of(7, 320) == 7 and n_of(500, 10) == 10
    with pytest.raises(ValueError):
        n_of(0, 10)


def test_cosine_to_mean_by_hand():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    target = np.array([[2.0, 0.0], [0.0, 0.0]])  # mean [1, 0]
    np.testing.assert_allclose(cosine_to_mean(pool, target), [1.0, 0.0, 1 / math.sqrt(2), 0.0])


def test_bm25_by_hand_max_and_concat():
    # Lucene BM25: idf · tf / (tf + k1 (1 - b + b · dl / avgdl)), idf = ln(1 + (N - df + 0.5) / (df + 0.5)).
    # N = 3, "cat" in 1 doc: idf = ln(8/3); doc 0 has tf = 1, dl = avgdl = 2: 1 / (1 + 1.5) = 0.4
    pool = ["cat sat", "dog ran", "bird flew"]
    idf = math.log(8 / 3) * 0.4
    np.testing.assert_allclose(bm25_scores(pool, ["cat"]), [idf, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(bm25_scores(pool, ["cat", "dog"], "max"), [idf, idf, 0], rtol=1e-5)
    np.testing.assert_allclose(bm25_scores(pool, ["cat", "dog"], "concat"), [idf, idf, 0], rtol=1e-5)
    # "the" is a stop word; a repeated query word counts twice: max(idf, 2 idf)
    np.testing.assert_allclose(bm25_scores(pool, ["the cat", "cat cat"], "max"), [2 * idf, 0, 0], rtol=1e-5)


def fake_corpus() -> pa.Table:
    rows = []
    for lang in ("eng_Latn", "deu_Latn", "fra_Latn", "ita_Latn", "spa_Latn", "jpn_Jpan"):
        rows += [{"id": f"par-{i:03d}", "text": f"{lang} sentence {i}", "source": "parallel", "lang": lang,
                  "label": 0} for i in range(24)]
    rows += [{"id": f"h{i:03d}", "text": f"doc {i}", "source": "python-docs", "lang": "eng_Latn", "label": 0}
             for i in range(200)]
    rows += [{"id": f"m{i:03d}", "text": f"gen {i}", "source": "smollm2-generated", "lang": "eng_Latn",
              "label": 1} for i in range(70)]
    return pa.Table.from_pylist(rows)


def test_demo_pool_is_deterministic_with_5_percent_hidden_positives():
    pool, target = demo_pool_tables(fake_corpus())
    assert pool.equals(demo_pool_tables(fake_corpus())[0])
    rows = pool.to_pylist()
    assert len(rows) == 320 and sum(r["label"] for r in rows) == 16
    assert {r["text"] for r in rows if r["label"]} == {f"eng_Latn sentence {i}" for i in range(8, 24)}
    assert target.column("text").to_pylist() == [f"eng_Latn sentence {i}" for i in range(8)]
    assert not set(target.column("text").to_pylist()) & {r["text"] for r in rows}
    by_source = {s: sum(r["source"] == s for r in rows) for s in ("python-docs", "smollm2-generated", "parallel")}
    assert by_source == {"python-docs": 180, "smollm2-generated": 60, "parallel": 80}
    assert {r["lang"] for r in rows if r["source"] == "parallel" and not r["label"]} == {
        "deu_Latn", "fra_Latn", "ita_Latn", "spa_Latn"}
    assert len({r["id"] for r in rows}) == 320


@pytest.mark.slow
def test_eval_finds_an_exact_copy_of_the_target(tmp_path, capsys):
    """Every method must rank a verbatim copy of the single target example first (J = 1, cos = 1)."""
    import pyarrow.parquet as pq

    from jobs.cli.main import main
    from jobs.demo.model import prepare_demo_model
    from operators.sae.io import save_sparsify
    from operators.sae.model import SAEConfig, SparseAutoencoder

    model = prepare_demo_model(log=lambda _msg: None)
    gen = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(576, 64, "topk", 4))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(576, 64, generator=gen) / 24)
    save_sparsify(sae, tmp_path / "sae", layer=3)
    texts = ["The library opens at nine in the morning.", "def f(x):\n    return x * 2",
             "Return a list of the lines in the string.", "Die Bibliothek öffnet um neun Uhr.",
             "We ate soup at the small bakery.", "Raise ValueError if the key is missing."]
    pq.write_table(pa.table({"text": texts, "label": [1, 0, 0, 0, 0, 0]}), tmp_path / "pool.parquet")
    pq.write_table(pa.table({"text": texts[:1]}), tmp_path / "target.parquet")
    argv = ["eval-selection", "--pool", str(tmp_path / "pool.parquet"), "--target", str(tmp_path / "target.parquet"),
            "--model", str(model), "--sae", str(tmp_path / "sae"), "--layer", "3", "--n", "1",
            "--max-tokens", "32", "--json"]
    assert main(argv) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 1 and result["pool_size"] == 6 and result["positives"] == 1
    assert result["precision"] == {"sae_jaccard": 1.0, "sae_jaccard_max": 1.0, "cosine_hidden": 1.0, "bm25_max": 1.0,
                                   "random": pytest.approx(1 / 6)}
    assert main(["eval-selection", "--pool", str(tmp_path / "pool.parquet")]) == 2
    assert "--target" in capsys.readouterr().err
