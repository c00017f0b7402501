"""``curate eval``: AUROC, ROC points, TPR at low FPR and balanced accuracy against hand-computed values."""

from __future__ import annotations

import json
import math
from itertools import product

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.cli.main import main
from jobs.eval.roc import (
    auroc,
    average_ranks,
    best_balanced_accuracy,
    evaluate_score,
    evaluate_table,
    roc_curve,
    tpr_at_fpr,
)


def test_average_ranks_share_ties():
    assert average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_roc_and_thresholds_by_hand():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 → 3/4
    s, y = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert auroc(s, y) == pytest.approx(0.75)
    fpr, tpr, thr = roc_curve(s, y)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr.tolist() == [math.inf, 0.8, 0.4, 0.35, 0.1]
    assert tpr_at_fpr(fpr, tpr, 0.05) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.5) == 1.0
    # ½(TPR + 1 - FPR) at each point: .5, .75, .5, .75, .5
    assert best_balanced_accuracy(fpr, tpr) == pytest.approx(0.75)


def test_ties_count_one_half_and_move_together():
    # positives 1, 1, 2; negative 1: pairs ½ + ½ + 1 = 2 of 3
    s, y = [1, 1, 1, 2], [0, 1, 1, 1]
    assert auroc(s, y) == pytest.approx(2 / 3)
    fpr, tpr, _ = roc_curve(s, y)
    assert fpr.tolist() == [0.0, 0.0, 1.0]              # the tie group at 1 is one diagonal step
    assert tpr.tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    result, _ = evaluate_score("s", s, y, direction="higher")
    assert result.tpr_at_fpr == pytest.approx(1 / 3)
    assert result.balanced_accuracy == pytest.approx(2 / 3)  # ½(1/3 + 1 - 0)


def test_constant_score_is_chance():
    result, _ = evaluate_score("c", [5, 5, 5, 5], [0, 1, 0, 1], direction="higher")
    assert (result.direction, result.auroc, result.tpr_at_fpr, result.balanced_accuracy) == \
        ("higher", 0.5, 0.0, 0.5)


def test_registered_lower_direction_is_reported():
    result, (fpr, tpr) = evaluate_score("ppl", [3.0, 2.0, 1.0, 0.0], [0, 0, 1, 1])
    assert result.direction == "lower"
    assert (result.auroc, result.tpr_at_fpr, result.balanced_accuracy) == (1.0, 1.0, 1.0)
    assert (fpr[:3].tolist(), tpr[:3].tolist()) == ([0, 0, 0], [0, 0.5, 1])  # in that direction


def test_missing_scores_are_left_out_and_counted():
    result, _ = evaluate_score("s", [0.1, float("nan"), 0.35, 0.8, 0.4], [0, 1, 1, 1, 0], direction="higher")
    assert result.n_missing == 1 and (result.n_pos, result.n_neg) == (2, 2)
    assert result.auroc == pytest.approx(0.75)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([1, 2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([1, 2], [0, 2])
    with pytest.raises(ValueError, match="different lengths"):
        auroc([1, 2, 3], [0, 1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=30))
def test_auroc_is_pairwise_probability_and_area_under_curve(rows):
    s = np.array([r[0] for r in rows], float)  # few distinct values: many ties
    y = np.array([r[1] for r in rows], int)
    if y.all() or not y.any():
        return
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0
             for a, b in product(s[y == 1], s[y == 0])]
    area = auroc(s, y)
    assert area == pytest.approx(np.mean(pairs))
    assert auroc(-s, y) == pytest.approx(1 - area)
    fpr, tpr, _ = roc_curve(s, y)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert trapezoid == pytest.approx(area)
    result, _ = evaluate_score("s", s, y, best=True)
    assert result.auroc >= 0.5 and 0.5 <= result.balanced_accuracy <= 1.0
    assert evaluate_score("s", s, y, direction="higher")[0].auroc == pytest.approx(area)


def test_evaluate_table_defaults_to_float_columns():
    table = pa.table({"id": ["a", "b", "c", "d"], "label": [0, 0, 1, 1],
                      "good": [0.1, 0.4, 0.35, 0.8], "n": [1, 2, 3, 4],
                      "bad": pa.array([None, 1.0, 2.0, 0.5], pa.float32())})
    results, curves = evaluate_table(table, best=True)
    assert [r.score for r in results] == ["good", "bad"] and set(curves) == {"good", "bad"}
    bad = results[1]
    # bad without the null: positives 2.0, 0.5; negative 1.0 → ½ either way
    assert (bad.n_missing, bad.auroc) == (1, 0.5)


def test_cli_writes_json_and_png(tmp_path, capsys):
    path = tmp_path / "labeled.parquet"
    pq.write_table(pa.table({"label": [0, 0, 1, 1], "mink": [0.1, 0.4, 0.35, 0.8],
                             "ppl": [9.0, 8.0, 2.0, 1.0]}), path)
    out = tmp_path / "eval"
    assert main(["eval", "--input", str(path), "--scores", "mink,ppl", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mink" in printed and "lower" in printed
    report = json.loads((out / "eval.json").read_text())
    by_name = {r["score"]: r for r in report["scores"]}
    assert by_name["mink"]["auroc"] == pytest.approx(0.75)
    assert by_name["ppl"] == {**by_name["ppl"], "direction": "lower", "auroc": 1.0}
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_names_missing_columns(tmp_path, capsys):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"label": [0, 1], "s": [0.1, 0.2]}), path)
    assert main(["eval", "--input", str(path), "--scores", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_scores_keep_their_registered_direction_even_below_chance():
    """A broken score shows up worse than chance: M__mink is 'higher ⇒ member' by definition, so
    reversed data gives AUROC 0 (not 1 after flipping), and TPR@5%FPR 0."""
    y = [0, 0, 1, 1]
    result, _ = evaluate_score("smollm2__mink", [4.0, 3.0, 2.0, 1.0], y)
    assert (result.direction, result.direction_from, result.auroc, result.tpr_at_fpr) == \
        ("higher", "registry", 0.0, 0.0)
    ppl, _ = evaluate_score("smollm2__ppl", [1.0, 2.0, 2.0, 3.0], y)  # lower ⇒ member; pairs 0 + ½ + 0 + 0
    assert (ppl.direction, ppl.auroc) == ("lower", pytest.approx(1 / 8))
    pawn, _ = evaluate_score("pawn_score", [0.9, 0.2, 0.8, 0.7], y)  # higher ⇒ machine: 2 of 4 pairs
    assert (pawn.direction, pawn.auroc) == ("higher", 0.5)
    with pytest.raises(ValueError, match="no registered direction"):
        evaluate_score("mystery", [1.0, 2.0, 3.0, 4.0], y)
    explored, _ = evaluate_score("smollm2__mink", [4.0, 3.0, 2.0, 1.0], y, best=True)
    assert (explored.direction, explored.auroc, explored.direction_from) == ("lower", 1.0, "best (exploratory)")


def test_cli_reports_below_chance_and_labels_best_direction(tmp_path, capsys):
    path = tmp_path / "labeled.parquet"
    pq.write_table(pa.table({"label": [0, 0, 1, 1], "m__mink": [4.0, 3.0, 2.0, 1.0],
                             "other": [1.0, 2.0, 3.0, 4.0]}), path)
    out = tmp_path / "eval"
    assert main(["eval", "--input", str(path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert [(r["score"], r["direction"], r["auroc"]) for r in report["scores"]] == [("m__mink", "higher", 0.0)]
    assert "other" in printed and "no registered direction" in printed
    assert main(["eval", "--input", str(path), "--direction", "other=lower"]) == 0
    assert "EXPLORATORY" not in capsys.readouterr().out
    assert main(["eval", "--input", str(path), "--best-direction"]) == 0
    assert "EXPLORATORY" in capsys.readouterr().out
