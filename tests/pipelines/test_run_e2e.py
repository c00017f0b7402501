"""End to end: `curate run` on a small corpus on a real local Ray."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import yaml
from conftest import tiny_pipeline

from jobs.cli.main import main
from pipelines.commit import MANIFEST


def test_curate_run_commits_every_table(tmp_path, small_corpus, local_ray, capsys):
    out = tmp_path / "out"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline(str(small_corpus), str(out))))

    assert main(["run", str(pipeline), "--date", "2026-03-04"]) == 0
    summary = capsys.readouterr().out
    assert "rows in 6 = out 5 + quarantined 1" in summary
    assert "token_premium" in summary

    docs = pq.read_table(out / "documents" / "run_date=2026-03-04")
    assert docs.num_rows == 5
    assert {"id", "text", "lang", "source_file", "source_row", "n_chars", "tokens__cl100k"} <= set(
        docs.column_names)
    quarantine = pq.read_table(out / "quarantine" / "run_date=2026-03-04").to_pylist()
    assert [q["id"] for q in quarantine] == ["x1"]
    assert "whitespace" in quarantine[0]["quarantine_reason"]

    manifest = json.loads((out / "documents" / "run_date=2026-03-04" / MANIFEST).read_text())
    assert manifest["rows"] == 5 and manifest["pipeline"] == "tiny" and manifest["config_hash"]

    premium = {r["lang"]: r for r in pq.read_table(out / "token_premium").to_pylist()}
    # parallel ids p1, p2: English "Hello world" (2) + "The cat sat on the mat." (7) = 9 tokens
    assert premium["eng_Latn"]["tokens"] == 9
    assert premium["fra_Latn"]["premium"] == premium["fra_Latn"]["tokens"] / 9
    assert (out / "reports" / "run_date=2026-03-04" / "token_premium.png").stat().st_size > 1000

    runs = pq.read_table(out / "runs").to_pylist()
    assert runs[0]["status"] == "committed"
    stages = json.loads(runs[0]["stages"])
    assert [s["name"] for s in stages] == ["read", "token_premium"]
    assert all(s["rows_in"] == s["rows_out"] + s["quarantined"] for s in stages)

    # rerunning the date replaces the partition, never duplicates it
    assert main(["run", str(pipeline), "--date", "2026-03-04"]) == 0
    assert pq.read_table(out / "documents" / "run_date=2026-03-04").num_rows == 5
    assert len(pq.read_table(out / "runs")) == 2


def test_bad_config_fails_before_ray(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: x\ninput: {url: /nowhere}\nstages: [{op: token_premium}]\n")
    assert main(["run", str(pipeline)]) == 2
    assert "stages.0.token_premium.tokenizers: Field required" in capsys.readouterr().err
