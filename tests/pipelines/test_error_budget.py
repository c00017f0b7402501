"""The error budget: a night that quarantines too much fails, commits nothing, and says why."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_rows, tiny_pipeline, write_shard

from jobs.cli.main import main
from jobs.ops.query import partitions
from operators.base import RunFailed
from pipelines.config import parse_config
from pipelines.runner import run_pipeline

V = 100  # vocabulary of the precomputed lm columns: ranks are c / V
LM_COLUMNS = ["m__logprob", "m__entropy", "m__logp2", "m__rank"]


def scored_corpus(root, n: int, bad: int) -> None:
    """n documents with precomputed lm columns (as an earlier run's lm stage writes them); the
    first ``bad`` have an entropy list shorter than their logprob list, which the scores stage rejects."""
    rows = {"id": [f"d{i:02d}" for i in range(n)], "text": [f"document number {i}" for i in range(n)]}
    rows["m__logprob"] = [[-1.0, -2.0, -0.5]] * n
    rows["m__entropy"] = [[1.0] if i < bad else [1.0, 1.5, 0.7] for i in range(n)]
    rows["m__logp2"] = [[2.0, 3.0, 1.0]] * n
    rows["m__rank"] = [[1 / V, 3 / V, 1 / V]] * n
    write_shard(root / "a.parquet", **rows)


def scores_pipeline(input_url: str, output_url: str, **stage) -> dict:
    return {
        "name": "budget",
        "input": {"url": input_url, "columns": LM_COLUMNS},
        "output": {"url": output_url},
        "stages": [
            {
                "op": "scores",
                "model": "m",
                "vocab_size": V,
                "zlib": False,
                "resources": {"num_cpus": 0.5, "batch_size": 64},
                **stage,
            }
        ],
    }


def committed(out) -> list[str]:
    """Tables with committed rows (``runs`` aside)."""
    return sorted(t for t in partitions(str(out)) if t != "runs")


def test_a_night_where_every_row_fails_exits_non_zero_and_commits_nothing(tmp_path, local_ray, capsys):
    scored_corpus(tmp_path / "in", n=20, bad=20)
    out = tmp_path / "out"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(scores_pipeline(str(tmp_path / "in"), str(out))))

    assert main(["run", str(tmp_path / "p.yaml"), "--date", "2026-03-04"]) == 1
    captured = capsys.readouterr()
    assert (
        "curate: error: run failed, nothing committed: error budget passed: the run quarantined 20 of 20 "
        "rows (100%), over max_quarantine_share 0.5; most by stage scores_m (20)" in captured.err
    )
    assert "differ in length" in captured.err  # a staged quarantine reason, since that table is not committed
    assert "committed" not in captured.out and "failed" in captured.out
    assert committed(out) == []  # no documents, no quarantine partition
    assert not list(out.glob("_data/*/*/*/*.parquet"))  # the failed run's staged files are gone
    (run,) = run_rows(out)
    assert run["status"] == "failed" and "error budget passed" in run["error"]
    assert run["rows_in"] == 20 and run["rows_quarantined"] == 20


def test_a_few_bad_rows_pass_the_default_budget_but_not_a_strict_stage_budget(tmp_path, local_ray):
    scored_corpus(tmp_path / "in", n=10, bad=2)
    result = run_pipeline(
        parse_config(scores_pipeline(str(tmp_path / "in"), str(tmp_path / "ok"))), "2026-03-04"
    )
    assert result.status == "committed" and result.tables == {"documents": 8, "quarantine": 2}

    strict = scores_pipeline(str(tmp_path / "in"), str(tmp_path / "strict"), max_quarantine_share=0.1)
    with pytest.raises(
        RunFailed,
        match=r"stage scores_m quarantined 2 of its 10 rows \(20%\), over its "
        r"max_quarantine_share 0\.1",
    ):
        run_pipeline(parse_config(strict), "2026-03-04")
    assert committed(tmp_path / "strict") == []
    runs = run_rows(tmp_path / "strict")
    assert runs[0]["status"] == "failed" and json.loads(runs[0]["stages"])[1]["quarantined"] == 2


def test_reference_language_absent_from_the_data_fails_naming_those_present(
    tmp_path, small_corpus, local_ray
):
    raw = tiny_pipeline(str(small_corpus), str(tmp_path / "out"))
    raw["stages"][0]["ref_lang"] = "xxx_Latn"
    with pytest.raises(
        RunFailed,
        match=r"token_premium\.ref_lang: 'xxx_Latn' is not in the data.*languages "
        r"present: \['eng_Latn', 'fra_Latn'\]",
    ):
        run_pipeline(parse_config(raw), "2026-03-04")
    assert committed(tmp_path / "out") == []
    assert [r["status"] for r in run_rows(tmp_path / "out")] == ["failed"]


def test_budget_arithmetic():
    from pipelines.budget import budget_errors
    from pipelines.runner import StageStats

    cfg = parse_config({"name": "b", "input": {"url": "/x"}, "max_quarantine_share": 0.25})
    ok = [StageStats("read", 100, 75, 25)]  # exactly at the budget: passes
    over = [StageStats("read", 100, 74, 26)]
    assert budget_errors(cfg, ok) == [] and len(budget_errors(cfg, over)) == 1
    assert budget_errors(cfg, [StageStats("read", 0, 0, 0)]) == []  # an empty night is not over budget
