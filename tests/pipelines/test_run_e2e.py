"""End to end: `curate run` on a small corpus on a real local Ray."""

from __future__ import annotations

import json

import yaml
from conftest import tiny_pipeline

from jobs.cli.main import main
from jobs.ops.query import query
from pipelines.tables import load_table, open_output


def test_curate_run_commits_every_table(tmp_path, small_corpus, local_ray, capsys):
    out = tmp_path / "out"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline(str(small_corpus), str(out))))

    assert main(["run", str(pipeline), "--date", "2026-03-04"]) == 0
    summary = capsys.readouterr().out
    assert "rows in 6 = out 5 + quarantined 1" in summary
    assert "token_premium" in summary

    docs = query(str(out), "SELECT * FROM documents")
    assert docs.num_rows == 5
    assert {"id", "text", "lang", "source_file", "source_row", "n_chars", "tokens__cl100k", "run_date"} <= set(
        docs.column_names)
    quarantine = query(str(out), "SELECT * FROM quarantine").to_pylist()
    assert [q["id"] for q in quarantine] == ["x1"]
    assert "whitespace" in quarantine[0]["quarantine_reason"]

    # every table is an Iceberg table in the embedded catalog, partitioned by run_date
    catalog = open_output(str(out)).catalog()
    for name in ("documents", "quarantine", "token_premium", "runs"):
        table = load_table(catalog, name)
        assert [f.name for f in table.spec().fields] == ["run_date"], name

    premium = {r["lang"]: r for r in query(str(out), "SELECT * FROM token_premium").to_pylist()}
    # parallel ids p1, p2: English "Hello world" (2) + "The cat sat on the mat." (7) = 9 tokens
    assert premium["eng_Latn"]["tokens"] == 9
    assert premium["fra_Latn"]["premium"] == premium["fra_Latn"]["tokens"] / 9
    assert (out / "reports" / "run_date=2026-03-04" / "token_premium.png").stat().st_size > 1000

    runs = query(str(out), "SELECT * FROM runs").to_pylist()
    assert runs[0]["status"] == "committed" and runs[0]["pipeline"] == "tiny" and runs[0]["config_hash"]
    assert set(json.loads(runs[0]["snapshots"])) >= {"documents", "quarantine", "token_premium"}
    stages = json.loads(runs[0]["stages"])
    assert [s["name"] for s in stages] == ["read", "token_premium"]
    assert all(s["rows_in"] == s["rows_out"] + s["quarantined"] for s in stages)

    # rerunning the date replaces the partition, never duplicates it
    assert main(["run", str(pipeline), "--date", "2026-03-04"]) == 0
    assert query(str(out), "SELECT count(*) AS n FROM documents").column("n")[0].as_py() == 5
    assert query(str(out), "SELECT count(*) AS n FROM runs").column("n")[0].as_py() == 2


def test_bad_config_fails_before_ray(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: x\ninput: {url: /nowhere}\nstages: [{op: token_premium}]\n")
    assert main(["run", str(pipeline)]) == 2
    assert "stages.0.token_premium.tokenizers: Field required" in capsys.readouterr().err
