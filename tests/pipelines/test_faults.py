"""Faults lose nothing: failing rows, out-of-memory batches, killed actors, a killed driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import tiny_pipeline, wait_for_lease_end, write_shard
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.ops.query import query
from operators.base import StageConfig
from pipelines.config import parse_config
from pipelines.io import read_shard
from pipelines.runner import run_pipeline
from pipelines.stage_runner import StageRunner


class FlakyConfig(StageConfig):
    """Test operator: fails on texts containing 'boom', and on batches larger than ``max_rows``."""

    op: Literal["flaky"] = "flaky"
    max_rows: int = 1000

    def build(self):
        return Flaky(self.max_rows)


class Flaky:
    def __init__(self, max_rows: int) -> None:
        self.max_rows, self.calls = max_rows, []

    def output_schema(self) -> pa.Schema:
        return pa.schema([("length", pa.int64())])

    def process(self, batch: pa.Table) -> pa.Table:
        self.calls.append(batch.num_rows)
        if batch.num_rows > self.max_rows:
            raise MemoryError(f"batch of {batch.num_rows} rows does not fit")
        texts = batch.column("text").to_pylist()
        if any("boom" in t for t in texts):
            raise ValueError("cannot handle boom")
        return pa.table({"length": [len(t) for t in texts]})


def batch_of(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table({"id": [str(i) for i in range(n)], "text": texts,
                     "quarantine_reason": pa.nulls(n, pa.string()),
                     "quarantine_stage": pa.nulls(n, pa.string())})


def test_one_bad_row_is_quarantined_and_the_rest_processed():
    runner = StageRunner(FlakyConfig())
    out = runner(batch_of(["a", "bb", "boom", "dddd"]))
    assert out.column("length").to_pylist() == [1, 2, None, 4]
    assert out.column("quarantine_reason").to_pylist() == [
        None, None, "flaky failed: ValueError: cannot handle boom", None]
    assert out.column("quarantine_stage").to_pylist() == [None, None, "flaky", None]


def test_out_of_memory_batch_is_retried_in_smaller_batches():
    runner = StageRunner(FlakyConfig(max_rows=3))
    out = runner(batch_of([f"doc {i}" for i in range(10)]))
    assert out.column("quarantine_reason").null_count == 10  # nothing quarantined
    assert out.column("length").to_pylist() == [len(f"doc {i}") for i in range(10)]
    assert runner.operator.calls[0] == 10 and max(runner.operator.calls[1:]) <= 5


def test_already_quarantined_rows_are_skipped():
    batch = batch_of(["a", "b"])
    batch = batch.set_column(2, "quarantine_reason", pa.array(["earlier", None]))
    out = StageRunner(FlakyConfig())(batch)
    assert out.column("length").to_pylist() == [None, 1]
    assert StageRunner(FlakyConfig())(batch).column("quarantine_reason").to_pylist() == ["earlier", None]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1), min_size=1, max_size=8))
def test_parquet_round_trip_of_arbitrary_unicode(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("uni") / "s.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    (batch,) = read_shard(str(path))
    for given_text, text in zip(texts, batch.column("text").to_pylist(), strict=True):
        assert text == given_text  # quarantined or not, the content is kept


def big_corpus(root, shards=4, rows=1500):
    for s in range(shards):
        write_shard(root / f"s{s}.parquet", id=[f"d{s}-{i}" for i in range(rows)],
                    text=[f"Document {s}-{i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(rows)],
                    lang=["eng_Latn"] * rows)
    return shards * rows


def stage_actor_pids() -> list[int]:
    """PIDs of live Ray actor processes running a stage (Ray sets their process title)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::") and "StageRunner" in cmdline:
            pids.append(proc.pid)
    return pids


def test_killed_actor_loses_nothing(tmp_path, local_ray):
    n = big_corpus(tmp_path / "in")
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))
    raw["stages"][0]["resources"] = {"batch_size": 100, "concurrency": 1}
    killed: list[int] = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            staged = list((tmp_path / "out" / "_data" / "documents").glob("*/*/*.parquet"))
            pids = stage_actor_pids() if staged else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_pipeline(parse_config(raw), "2026-02-02")
    thread.join()
    assert killed, "the stage actor was never killed"
    ids = query(str(tmp_path / "out"), "SELECT id FROM documents").column("id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n  # every row exactly once
    assert result.rows_out == n


def test_killed_driver_then_rerun_matches_uninterrupted_run(tmp_path, local_ray):
    big_corpus(tmp_path / "in", shards=3, rows=800)
    clean = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "clean"))
    run_pipeline(parse_config(clean), "2026-02-03")

    out = tmp_path / "out"
    raw = tiny_pipeline(str(tmp_path / "in"), str(out))
    write_shard(tmp_path / "prev" / "p.parquet", text=["previous night"])
    prev = {**raw, "input": {"url": str(tmp_path / "prev")}}
    run_pipeline(parse_config(prev), "2026-02-03")  # a committed partition to protect

    previous = set(out.glob("_data/documents/*/*/*.parquet"))  # the committed night's files
    script = textwrap.dedent(f"""
        import ray
        from pipelines.config import parse_config
        from pipelines.runner import run_pipeline
        ray.init(num_cpus=2, include_dashboard=False)
        run_pipeline(parse_config({raw!r}), "2026-02-03")
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "CURATE_LOCK_LEASE_S": "5"})  # its lock outlives it 5 s
    deadline = time.time() + 120
    while time.time() < deadline and not set(out.glob("_data/documents/*/*/*.parquet")) - previous:
        time.sleep(0.1)
    staged = bool(set(out.glob("_data/documents/*/*/*.parquet")) - previous)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its embedded Ray die mid-run
    driver.wait()
    assert staged, "the driver never staged a batch before the deadline"
    assert query(str(out), "SELECT text FROM documents").column("text").to_pylist() == ["previous night"]

    wait_for_lease_end(out, "2026-02-03")  # the killed run's lease ends by itself
    run_pipeline(parse_config(raw), "2026-02-03")
    sql = "SELECT id, text, n_chars, tokens__cl100k FROM documents ORDER BY id"
    rerun = query(str(out), sql)
    uninterrupted = query(str(tmp_path / "clean"), sql)
    assert rerun.equals(uninterrupted)
