"""The offline demo assets: a real converted model and a labelled, idempotently built corpus."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from jobs.demo.assets import DemoAssets, prepare_demo_assets
from jobs.demo.cache import MARKER
from jobs.demo.corpus import N_HUMAN, N_MACHINE, SCHEMA, doc_id, parallel_sentences
from jobs.demo.model import greedy_next_token


@pytest.fixture(scope="session")
def assets() -> DemoAssets:
    """The demo assets in the default cache (built once, reused by later sessions)."""
    return prepare_demo_assets(log=lambda _msg: None)


@pytest.fixture(scope="session")
def corpus(assets: DemoAssets) -> pa.Table:
    """The whole demo corpus as one table."""
    return ds.dataset(assets.corpus_dir, format="parquet").to_table()


def rows(table: pa.Table, source: str) -> list[dict]:
    """Rows of one source, as dicts."""
    return [r for r in table.to_pylist() if r["source"] == source]


def test_converted_model_knows_berlin(assets: DemoAssets) -> None:
    assert greedy_next_token(assets.model_dir, "The capital of Germany is") == " Berlin"


def test_model_dir_is_plain_safetensors(assets: DemoAssets) -> None:
    config = (assets.model_dir / "config.json").read_text()
    assert "quantization_config" not in config
    assert (assets.model_dir / "model.safetensors").is_file()


def test_corpus_shards_and_schema(assets: DemoAssets, corpus: pa.Table) -> None:
    names = sorted(p.name for p in assets.corpus_dir.glob("*.parquet"))
    assert names == ["human-00000.parquet", "human-00001.parquet", "machine-00000.parquet",
                     "parallel-00000.parquet"]
    assert corpus.schema.equals(SCHEMA, check_metadata=False)


def test_human_and_machine_docs(corpus: pa.Table) -> None:
    human, machine = rows(corpus, "python-docs"), rows(corpus, "smollm2-generated")
    assert (len(human), len(machine)) == (N_HUMAN, N_MACHINE)
    assert {r["label"] for r in human} == {0} and {r["label"] for r in machine} == {1}
    assert all(400 <= len(r["text"]) <= 2000 for r in human)
    docs = human + machine
    assert {r["lang"] for r in docs} == {"eng_Latn"}
    assert len({r["id"] for r in docs}) == len(docs)
    assert all(r["id"] == doc_id(r["text"]) for r in docs)


def test_parallel_set_joins_on_id(assets: DemoAssets, corpus: pa.Table) -> None:
    parallel = rows(corpus, "parallel")
    ids_by_lang: dict[str, set[str]] = {}
    for r in parallel:
        ids_by_lang.setdefault(r["lang"], set()).add(r["id"])
    assert len(ids_by_lang) >= 14
    expected = {f"par-{i:03d}" for i in range(len(parallel_sentences()["eng_Latn"]))}
    assert len(expected) >= 20 and all(ids == expected for ids in ids_by_lang.values())
    assert {r["label"] for r in parallel} == {0}
    alone = ds.dataset(assets.parallel_dir, format="parquet").to_table()
    assert alone.num_rows == len(parallel)


def test_parallel_sentences_are_short_and_complete() -> None:
    sentences = parallel_sentences()
    assert all(8 <= len(s.split()) <= 25 for s in sentences["eng_Latn"])
    assert all(s.strip() for texts in sentences.values() for s in texts)


def markers(assets: DemoAssets) -> dict[Path, int]:
    """Marker file -> mtime (ns) for every prepared directory."""
    dirs = (assets.model_dir, assets.corpus_dir, assets.parallel_dir)
    return {d / MARKER: (d / MARKER).stat().st_mtime_ns for d in dirs}


def test_second_prepare_does_no_work(assets: DemoAssets) -> None:
    before = markers(assets)
    said: list[str] = []
    start = time.perf_counter()
    again = prepare_demo_assets(log=said.append)
    assert time.perf_counter() - start < 5
    assert again == assets and markers(again) == before
    assert all("cached" in line for line in said), said
