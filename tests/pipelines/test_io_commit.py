"""Reading, id derivation, staged writes, atomic commit and recovery."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_pipeline, write_shard

from pipelines.commit import MANIFEST, RunLayout, commit_table, recover
from pipelines.config import parse_config
from pipelines.io import InputError, content_id, list_shards, read_shard
from pipelines.runner import run_pipeline


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
    assert reasons[3] == f"control character U+0000 at offset 1 ({path} row 3)"


def test_list_shards_errors_name_the_url(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .parquet files"):
        list_shards(str(tmp_path / "empty"))


def test_memory_round_trip(local_ray):
    """memory:// in, memory:// out: Ray workers can't see it, so the driver reads and writes."""
    fs = fsspec.filesystem("memory")
    with fs.open("/rt/in/s0.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ["a", "b"], "text": ["Hello world", "naïve café ünïcödé"],
                                 "lang": ["eng_Latn", "fra_Latn"]}), f)
    cfg = parse_config(tiny_pipeline("memory://rt/in", "memory://rt/out", name="mem"))
    result = run_pipeline(cfg, "2026-01-02")
    assert result.status == "committed" and result.rows_out == 2
    part = "/rt/out/documents/run_date=2026-01-02"
    assert fs.exists(f"{part}/{MANIFEST}")
    files = [p for p in fs.find(part) if p.endswith(".parquet")]
    with fs.open(files[0], "rb") as f:
        back = pq.read_table(f)
    assert sorted(back.column("text").to_pylist()) == ["Hello world", "naïve café ünïcödé"]
    assert all(n > 0 for n in back.column("tokens__cl100k").to_pylist())


def _committed_text(out, date: str) -> list[str]:
    part = out / "documents" / f"run_date={date}"
    assert (part / MANIFEST).exists()
    return sorted(pq.read_table(part).column("text").to_pylist())


def test_run_killed_between_staging_and_commit_keeps_previous_partition(tmp_path, small_corpus, local_ray):
    out = tmp_path / "out"
    raw = tiny_pipeline(str(small_corpus), str(out))
    run_pipeline(parse_config(raw), "2026-01-01")
    before = _committed_text(out, "2026-01-01")
    write_shard(small_corpus / "c.parquet", id=["new"], text=["A new document arrives."], lang=["eng_Latn"])

    # a real process that stages everything, then dies (SIGKILL-like _exit) right before commit
    script = textwrap.dedent(f"""
        import os, ray
        import pipelines.runner as runner
        from pipelines.config import parse_config
        runner.commit_run = lambda *a, **k: os._exit(9)
        ray.init(num_cpus=2, include_dashboard=False)
        runner.run_pipeline(parse_config({raw!r}), "2026-01-01")
    """)
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-2000:]
    assert list((out / "_staging" / "2026-01-01").glob("*/documents/*/*.parquet")), "nothing was staged"
    assert _committed_text(out, "2026-01-01") == before  # previous partition intact and readable

    rerun = run_pipeline(parse_config(raw), "2026-01-01")  # rerunning the date completes
    after = _committed_text(out, "2026-01-01")
    assert after == sorted([*before, "A new document arrives."])
    assert rerun.rows_out == len(after)  # replaced, not duplicated
    assert not list((out / "_staging").glob("2026-01-01/*"))


def test_recover_restores_a_partition_moved_to_trash(tmp_path):
    fs = fsspec.filesystem("file")
    layout = RunLayout.for_url(str(tmp_path), "2026-01-01", "r1")
    old = tmp_path / "documents" / "run_date=2026-01-01"
    old.mkdir(parents=True)
    (old / MANIFEST).write_text("{}")
    staged = tmp_path / "_staging" / "2026-01-01" / "r1" / "documents" / "run_date=2026-01-01"
    staged.mkdir(parents=True)
    # die after the first rename of a commit: old partition in _trash, new one not yet in place
    fs.makedirs(layout.trash_dir("documents").rsplit("/", 1)[0], exist_ok=True)
    fs.mv(str(old), layout.trash_dir("documents"), recursive=True)
    assert not old.exists()
    assert recover(str(tmp_path)) == [str(old)]
    assert (old / MANIFEST).exists()
    (staged / MANIFEST).write_text('{"new": true}')
    commit_table(layout, "documents")
    assert (old / MANIFEST).read_text() == '{"new": true}'
