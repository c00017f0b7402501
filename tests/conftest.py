"""Shared fixtures: one real local Ray per test session, small corpora written to tmp dirs."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest_plugins = ["tests.services"]

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def local_ray():
    """A real embedded Ray (2 CPUs), started once and shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_shard(path: Path, **columns: list) -> Path:
    """Write one Parquet shard from column lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """Two shards, 6 documents, two languages; one empty text to be quarantined."""
    root = tmp_path / "corpus"
    write_shard(root / "a.parquet", id=["p1", "p2", "x1"],
                text=["Hello world", "The cat sat on the mat.", "   "],
                lang=["eng_Latn", "eng_Latn", "eng_Latn"])
    write_shard(root / "b.parquet", id=["p1", "p2", "y1"],
                text=["Bonjour le monde", "Le chat était assis sur le tapis.", "Sans pareil"],
                lang=["fra_Latn", "fra_Latn", "fra_Latn"])
    return root


def tiny_pipeline(input_url: str, output_url: str, name: str = "tiny") -> dict:
    """A pipeline mapping with one token-premium stage on the offline cl100k_base encoding."""
    return {
        "name": name,
        "input": {"url": input_url},
        "output": {"url": output_url},
        "stages": [{"op": "token_premium",
                    "tokenizers": [{"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"}],
                    "resources": {"batch_size": 64}}],
    }


@pytest.fixture
def one_torch_thread():
    """Tiny models: intra-op threads only add contention (and stall badly on a loaded 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_freq_table() -> Path:
    """The demo DC-PDD table that pipelines/nightly.yaml names: its validation checks that the file
    exists (seconds to build, cached)."""
    from jobs.demo.freq import prepare_demo_freq

    return prepare_demo_freq(log=lambda _msg: None)


def commit_tables(url: str, run_date: str, run_id: str, tables: dict, status: str = "committed",
                  **run: object) -> dict:
    """Stage ``tables`` and commit them as one night with the real commit code, plus its ``runs`` row."""
    import json

    import pyarrow as pa

    from pipelines.staging import stage_rows
    from pipelines.tables import RUNS_SCHEMA, append_run_row, commit_night, now, open_output

    output = open_output(url)
    catalog = output.catalog(create=True)
    staged = [stage_rows(output, table, run_date, run_id, "part-0", rows) for table, rows in tables.items()]
    committed = commit_night(catalog, run_date, staged) if status == "committed" else {}
    row = {name: None for name in RUNS_SCHEMA.names} | {
        "run_id": run_id, "run_date": run_date, "pipeline": "p", "status": status, "committed_at": now(),
        "snapshots": json.dumps({t: s for t, (s, _) in committed.items()})} | run
    append_run_row(catalog, row)
    assert pa is not None
    return committed


def table_rows(out: Path | str, table: str, date: str | None = None, columns: str = "*") -> list[dict]:
    """Committed rows of ``table`` under the output ``out`` (only ``date``'s when given), read through
    the catalog; [] when that table has no committed rows."""
    from jobs.ops.query import partitions, query

    if table not in partitions(str(out), date):
        return []
    return query(str(out), f"SELECT {columns} FROM {table}", date=date).to_pylist()


def run_rows(out: Path | str) -> list[dict]:
    """Every ``runs`` row of the output ``out`` (failed runs too), in the order they were appended."""
    from jobs.ops.query import partitions, query

    if "runs" not in partitions(str(out)):
        return []
    return query(str(out), "SELECT * FROM runs ORDER BY committed_at").to_pylist()


def wait_for_lease_end(out: Path | str, run_date: str, timeout: float = 120) -> None:
    """Wait until no live run holds the lock of ``run_date`` in the output's catalog (a killed run's
    lease ends by itself)."""
    import time

    from pipelines.lock import held_locks
    from pipelines.tables import open_output

    catalog = open_output(str(out)).catalog()
    deadline = time.time() + timeout
    while run_date in held_locks(catalog):
        assert time.time() < deadline, f"the lock of {run_date} is still held after {timeout} s"
        time.sleep(0.2)


# ------------------------------------------------------------------ helpers shared across test modules


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo model's transformers directory (SmolLM2-135M-Instruct, built once, cached)."""
    from jobs.demo.model import prepare_demo_model

    return prepare_demo_model(log=lambda _msg: None)


def random_sae(d_in: int, d_sae: int = 64, k: int = 4, seed: int = 0, bias_std: float = 0.0):
    """A TopK SAE with seeded random weights of the right shapes: W_enc ~ N(0, 1/d_in),
    W_dec ~ N(0, 1/d_sae), and b_enc ~ N(0, bias_std²) when ``bias_std`` > 0 (else zero)."""
    import torch

    from operators.sae.model import SAEConfig, SparseAutoencoder

    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in, d_sae, "topk", k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / math.sqrt(d_in))
        if bias_std > 0:
            sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * bias_std)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) / math.sqrt(d_sae))
    return sae.requires_grad_(False).eval()
