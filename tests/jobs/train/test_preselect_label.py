"""PreSelect labels and training (jobs/train/preselect.py, jobs/demo/preselect.py).

The end-to-end tests use the real demo family (the demo model cut to 10, 15, 20 and 30 blocks,
``python -m jobs.demo.preselect``) on a real local Ray.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import fasttext
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_shard

from jobs.cli.main import main
from jobs.demo.corpus import human_docs
from jobs.demo.preselect import is_heldout, prepare_demo_family
from jobs.errors import UserError
from jobs.train.preselect import Family, clip_text, label_frame, load_family

# ------------------------------------------------------------------------ labels, by hand

FAMILY = Family(models=[{"name": "a", "path": "/x", "bench_score": 1.0},
                        {"name": "b", "path": "/x", "bench_score": 2.0},
                        {"name": "c", "path": "/x", "bench_score": 3.0}])


def test_label_frame_by_hand():
    # Every text has 10 chars, so BPC = nll / (10 ln 2) keeps the order of nll. Scores a < b < c,
    # so S = 1 needs L_a > L_b > L_c (pairs (a,b), (a,c), (b,c)).
    docs = pa.table({"id": ["d1", "d2", "d3", "d4", "d5", "d6"], "text": ["full text"] * 6,
                     "scored_text": ["0123456789"] * 6})
    scored = pl.DataFrame({
        "id": ["d1", "d2", "d3", "d4", "d5", "d6"],
        "a__nll_sum": [3.0, 3.0, 1.0, 3.0, 3.0, None],  # d6: a has no loss  -> skipped
        "b__nll_sum": [2.0, 1.0, 2.0, 2.0, 2.0, 2.0],
        "c__nll_sum": [1.0, 2.0, 3.0, 1.0, 1.0, 1.0],
        "a__truncated": [False] * 6, "b__truncated": [False] * 6,
        "c__truncated": [False, False, False, False, True, False],  # d5: c cut its text -> skipped
    })
    # d1: 3>2, 3>1, 2>1 -> S = 1; d4 the same; d2: (a,b) ✓ (a,c) ✓ (b,c) 1>2 ✗ -> 2/3; d3: all ✗ -> 0
    labels, skipped, strength = label_frame(FAMILY, docs, scored)
    np.testing.assert_allclose(strength[:4], [1.0, 2 / 3, 0.0, 1.0])
    assert math.isnan(strength[4]) and math.isnan(strength[5])
    assert skipped == {"missing_loss": 1, "truncated": 1}
    # balanced: min(2 positives, 2 others) = 2 each; negatives by lowest S: d3 (0), d2 (2/3)
    assert labels["id"].to_list() == ["d1", "d4", "d3", "d2"]
    assert labels["label"].to_list() == [1, 1, 0, 0]
    assert labels["text"].to_list() == ["full text"] * 4  # the full text, not the scored prefix
    row = labels.row(0, named=True)
    assert row["n_chars"] == 10 and row["a__nll_sum"] == 3.0
    assert row["a__bpc"] == pytest.approx(3.0 / (10 * math.log(2)))
    assert labels.columns == ["id", "text", "S", "label", "n_chars", "a__nll_sum", "a__bpc", "b__nll_sum",
                              "b__bpc", "c__nll_sum", "c__bpc"]
    # asked-for counts: 1 positive (smallest id), 1 negative (lowest S)
    labels, _, _ = label_frame(FAMILY, docs, scored, n_positive=1, n_negative=1)
    assert labels["id"].to_list() == ["d1", "d3"]


def test_clip_text_cuts_at_whitespace():
    assert clip_text("short", 10) == "short"
    assert clip_text("alpha beta gamma", 12) == "alpha beta"  # "alpha beta g" -> last space at 10
    assert clip_text("x" * 20, 8) == "x" * 8  # no space: a hard cut


def test_family_validation_and_tie_warning(tmp_path, capsys):
    bad = tmp_path / "two.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "a", "path": "/x", "bench_score": 1}] * 2}))
    with pytest.raises(UserError, match="models: List should have at least 3 items"):
        load_family(bad)
    tied = tmp_path / "tied.yaml"
    tied.write_text(yaml.safe_dump({"models": [{"name": n, "path": "/x", "bench_score": s}
                                               for n, s in (("a", 1), ("b", 1), ("c", 2))]}))
    assert load_family(tied).tied_pairs() == [("a", "b")]
    code = main(["preselect", "label", "--family", str(tied), "--input", str(tmp_path / "nowhere"),
                 "--output", str(tmp_path / "l.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and "models a and b have the same bench_score" in err and "input not found" in err


# ------------------------------------------------------------------------ the demo family


@pytest.fixture(scope="module")
def family_path() -> Path:
    return prepare_demo_family(log=lambda _: None)


def test_demo_family_scores_increase_with_depth(family_path):
    family = yaml.safe_load(family_path.read_text())
    models = sorted(family["models"], key=lambda m: m["layers"])
    assert len(models) >= 3 and family["benchmark"]["metric"] == "next_token_accuracy"
    scores = [m["bench_score"] for m in models]
    assert all(b > a for a, b in zip(scores, scores[1:], strict=False)), scores
    assert all(0 < s < 1 for s in scores)
    for m in models:  # real, distinct checkpoints: each config has its own depth
        config = yaml.safe_load((Path(m["path"]) / "config.json").read_text())
        assert config["num_hidden_layers"] == m["layers"]


def test_label_cli_end_to_end(tmp_path, family_path, local_ray, capsys):
    from jobs.demo.corpus import prepare_demo_corpus

    docs = human_docs(prepare_demo_corpus(log=lambda _: None))
    pool = [r for r in docs.to_pylist() if not is_heldout(r["id"])][:11]
    write_shard(tmp_path / "in" / "a.parquet", id=[r["id"] for r in pool] + ["tiny"],
                text=[r["text"] for r in pool] + ["a"])  # "a": one token, scored after the context token
    out = tmp_path / "labels.parquet"
    assert main(["preselect", "label", "--family", str(family_path), "--input", str(tmp_path / "in"),
                 "--output", str(out), "--max-docs", "12", "--max-tokens", "64", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "sample: 12 documents" in printed and "texts cut to 192 chars" in printed
    # every member scores every content token (score_first_token), so even "a" has a loss from each
    assert "skipped 0 documents (missing a model's loss: 0, truncated at max_tokens=64: 0)" in printed

    labels = pl.read_parquet(out)
    family = load_family(family_path)
    names = [m.name for m in family.models]
    assert labels.columns[:5] == ["id", "text", "S", "label", "n_chars"]
    assert {f"{n}__bpc" for n in names} <= set(labels.columns)
    pos, neg = labels.filter(pl.col("label") == 1), labels.filter(pl.col("label") == 0)
    assert pos.height == neg.height > 0
    assert (pos["S"] == 1).all() and (neg["S"] < 1).all()
    # S recomputed pair by pair from the written BPC columns and the family's scores
    bench = {m.name: m.bench_score for m in family.models}
    for row in labels.iter_rows(named=True):
        assert row["n_chars"] <= 192
        agree = sum((bench[i] > bench[j]) == (row[f"{i}__bpc"] < row[f"{j}__bpc"])
                    for k, i in enumerate(names) for j in names[k + 1:])
        assert row["S"] == pytest.approx(agree / math.comb(len(names), 2))
        assert row[f"{names[0]}__bpc"] == pytest.approx(row[f"{names[0]}__nll_sum"] / (row["n_chars"] * math.log(2)))


# ------------------------------------------------------------------------ train


def test_train_cli_reports_precision_and_recall(tmp_path, capsys):
    rng = random.Random(1)
    rows = []
    for i in range(120):
        words = ("good", "clear", "useful") if i % 2 else ("bad", "noisy", "spam")
        rows.append({"id": str(i), "text": " ".join(rng.choice(words) for _ in range(8)) + "\nend",
                     "label": i % 2})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labels.parquet")
    model = tmp_path / "model.bin"
    assert main(["preselect", "train", "--labels", str(tmp_path / "labels.parquet"), "--output", str(model),
                 "--epoch", "10", "--dim", "16", "--bucket", "20000", "--valid-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "trained on 90 documents, held out 30" in printed
    assert "held-out precision 1.000  recall 1.000" in printed
    assert sorted(fasttext.load_model(str(model)).get_labels()) == ["__label__0", "__label__1"]
    assert main(["preselect", "train", "--labels", str(tmp_path / "none.parquet"), "--output", str(model)]) == 2
