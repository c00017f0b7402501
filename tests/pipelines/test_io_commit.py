"""Reading, id derivation, staged writes and a run killed before its commit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_pipeline, wait_for_lease_end, write_shard

from jobs.ops.query import query
from pipelines.config import parse_config
from pipelines.io import InputError, content_id, list_shards, read_shard
from pipelines.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_content_id_is_sha1_prefix():
    # sha1("Hello world") = 7b502c3a1f48c8609ae212cdfb639dee39673f5e
    assert content_id("Hello world") == "7b502c3a1f48c860"


def test_missing_ids_are_derived_and_given_ids_kept(tmp_path):
    path = write_shard(tmp_path / "s.parquet", id=["given", None], text=["Hello world", "Hello world"])
    (batch,) = read_shard(str(path))
    assert batch.column("id").to_pylist() == ["given", "7b502c3a1f48c860"]
    no_id = write_shard(tmp_path / "t.parquet", text=["Hello world"])
    (batch,) = read_shard(str(no_id))
    assert batch.column("id").to_pylist() == ["7b502c3a1f48c860"]


def test_bad_rows_are_quarantined_with_file_and_row(tmp_path):
    path = write_shard(tmp_path / "s.parquet", text=["ok", None, " \n", "a\x00b"])
    (batch,) = read_shard(str(path))
    reasons = batch.column("quarantine_reason").to_pylist()
    assert reasons[0] is None
    assert reasons[1] == f"null text ({path} row 1)"
    assert reasons[2] == f"empty or whitespace-only text ({path} row 2)"
    assert reasons[3] is None  # input.control_chars: keep (the default): data, counted
    assert batch.column("n_control_chars").to_pylist() == [0, None, 0, 1]
    (batch,) = read_shard(str(path), control_chars="quarantine")
    assert batch.column("quarantine_reason").to_pylist()[3] == (
        f"control character U+0000 at offset 1 ({path} row 3)")


def test_list_shards_errors_name_the_url(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .parquet files"):
        list_shards(str(tmp_path / "empty"))


def test_memory_input_round_trip(local_ray, tmp_path):
    """memory:// in: Ray workers can't see it, so the driver reads; the tables are committed as usual."""
    fs = fsspec.filesystem("memory")
    with fs.open("/rt/in/s0.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ["a", "b"], "text": ["Hello world", "naïve café ünïcödé"],
                                 "lang": ["eng_Latn", "fra_Latn"]}), f)
    cfg = parse_config(tiny_pipeline("memory://rt/in", str(tmp_path / "out"), name="mem"))
    result = run_pipeline(cfg, "2026-01-02")
    assert result.status == "committed" and result.rows_out == 2
    back = query(str(tmp_path / "out"), "SELECT text, tokens__cl100k FROM documents")
    assert sorted(back.column("text").to_pylist()) == ["Hello world", "naïve café ünïcödé"]
    assert all(n > 0 for n in back.column("tokens__cl100k").to_pylist())


def _committed_text(out, date: str) -> list[str]:
    return sorted(query(str(out), "SELECT text FROM documents", date=date).column("text").to_pylist())


def test_run_killed_between_staging_and_commit_keeps_previous_night(tmp_path, small_corpus, local_ray):
    out = tmp_path / "out"
    raw = tiny_pipeline(str(small_corpus), str(out))
    run_pipeline(parse_config(raw), "2026-01-01")
    before = _committed_text(out, "2026-01-01")
    write_shard(small_corpus / "c.parquet", id=["new"], text=["A new document arrives."], lang=["eng_Latn"])

    # a real process that stages everything, then is killed (SIGKILL) right before the commit
    script = textwrap.dedent(f"""
        import ray
        import pipelines.runner as runner
        from pipelines.config import parse_config
        ray.init(num_cpus=2, include_dashboard=False)
        runner.run_pipeline(parse_config({raw!r}), "2026-01-01")
    """)
    env = {**os.environ, "CURATE_COMMIT_HOOK": "before:documents:kill", "CURATE_LOCK_LEASE_S": "5"}
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert died.returncode == -9, died.stderr[-2000:]
    assert list((out / "_data" / "documents" / "run_date=2026-01-01").glob("*/*.parquet"))
    assert _committed_text(out, "2026-01-01") == before  # previous night intact and readable

    wait_for_lease_end(out, "2026-01-01")  # the killed run's lock
    rerun = run_pipeline(parse_config(raw), "2026-01-01")  # rerunning the date completes (lock taken over)
    after = _committed_text(out, "2026-01-01")
    assert after == sorted([*before, "A new document arrives."])
    assert rerun.rows_out == len(after)  # replaced, not duplicated
