"""The result cache end to end on a real local Ray: the demo corpus, then a night that half repeats
it, with and without the cache; a changed model file; a broken cache; upkeep."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipelines.cache import cache_stats, cache_tables, load_table
from pipelines.config import parse_config
from pipelines.maintain import maintain
from pipelines.runner import run_pipeline
from pipelines.tables import open_output

DEMO = Path.home() / ".cache" / "curate" / "demo"
TABLES = ("documents", "selected", "token_premium")

pytestmark = pytest.mark.skipif(not (DEMO / "corpus").exists() or not (DEMO / "smollm2-135m-instruct").exists(),
                                reason="demo corpus and tokenizer not built (python -m jobs.demo)")


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> dict[str, Path]:
    """The demo corpus split in thirds A, B, C by row: night 1 reads A+B, night 2 B+C (half repeats)."""
    corpus = pads.dataset(str(DEMO / "corpus")).to_table(columns=["id", "text", "lang"])
    root = tmp_path_factory.mktemp("nights")
    idx = list(range(corpus.num_rows))
    third = {p: [i for i in idx if i % 3 == p] for p in range(3)}
    out = {}
    for night, parts in (("1", (0, 1)), ("2", (1, 2))):
        (root / night).mkdir()
        pq.write_table(corpus.take(sorted(third[parts[0]] + third[parts[1]])), root / night / "part-0.parquet")
        out[night] = root / night
    return out


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> str:
    from jobs.train.preselect import train_isolated

    rng = random.Random(0)
    texts = [" ".join(rng.choice(("the", "code", "def", "data", "und", "le")) for _ in range(8)) for _ in range(80)]
    out = tmp_path_factory.mktemp("scorer") / "model.bin"
    train_isolated(texts, [i % 2 for i in range(80)], str(out), epoch=5, lr=0.5, dim=8, bucket=1000,
                   valid_fraction=0.2)
    return str(out)


def _pipeline(input_dir: Path, out: Path, tokenizer: Path, scorer: str, cache: dict) -> dict:
    return {
        "name": "cachetest", "input": {"url": str(input_dir)}, "output": {"url": str(out)},
        "cache": cache,
        "stages": [
            {"op": "token_premium", "tokenizers": [{"name": "smollm2", "kind": "hf", "path": str(tokenizer)},
                                                   {"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"}],
             "resources": {"num_cpus": 0.5, "batch_size": 128}},
            {"op": "preselect", "model": scorer, "selection": {"policy": "top_fraction_chars", "fraction": 0.2},
             "resources": {"num_cpus": 0.5, "batch_size": 256}},
        ],
    }


def _rows(out: Path, table: str, date: str) -> tuple[list[str], list[tuple]]:
    from jobs.ops.query import query

    t = query(str(out), f"SELECT * EXCLUDE (run_date) FROM {table}", date=date)
    return t.column_names, sorted(tuple(repr(v) for v in r.values()) for r in t.to_pylist())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stage(result, name):
    return next(s for s in result.stages if s.name == name)


def test_cached_nights_give_the_same_tables(tmp_path, nights, scorer, local_ray, caplog):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "smollm2-135m-instruct" / f, tokenizer / f)
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    on = {"stages": ["token_premium", "preselect"]}

    def run(night, out, date, cache):
        return run_pipeline(parse_config(_pipeline(nights[night], out, tokenizer, scorer, cache)), date)

    first = run("1", cached, "2026-02-01", on)
    second = run("2", cached, "2026-02-02", on)
    for night, date in (("1", "2026-02-01"), ("2", "2026-02-02")):
        run(night, plain, date, {"enabled": False})
    for date in ("2026-02-01", "2026-02-02"):
        for table in TABLES:
            assert _rows(cached, table, date) == _rows(plain, table, date), (table, date)

    n1, n2 = first.rows_in, second.rows_in
    assert _stage(first, "token_premium").cache_hits == 0
    # night 2 repeats B (a third of the corpus): every one of its rows is a hit
    repeated = len(pads.dataset(str(nights["1"])).to_table()) + n2 - 840
    assert _stage(second, "token_premium").cache_hits == repeated
    assert _stage(second, "preselect").cache_hits == repeated
    assert _stage(second, "token_premium").cache_misses == n2 - repeated
    catalog = open_output(str(cached)).catalog()
    stats = {s["stage"]: s for s in cache_stats(catalog)}
    distinct = len(set(pads.dataset(str(DEMO / "corpus")).to_table().column("text").to_pylist()))
    assert stats["token_premium"]["entries"] == distinct == stats["preselect"]["entries"]  # one per text
    assert n1 + n2 - repeated == 840

    # a changed model file (the tokenizer's) misses: a new fingerprint, a new table, nothing stale
    with open(tokenizer / "tokenizer.json", "a") as f:
        f.write("\n")
    third = run("2", cached, "2026-02-03", on)
    assert _stage(third, "token_premium").cache_hits == 0
    assert _stage(third, "preselect").cache_hits == n2  # its own key did not change
    assert len(cache_tables(catalog)) == 3

    # a cache file that cannot be read: the night runs without it, with a warning, same tables
    table = load_table(catalog, next(n for n in cache_tables(catalog) if "preselect" in n))
    victim = next(iter(table.scan().plan_files())).file.file_path
    Path(victim.removeprefix("file://")).write_bytes(b"not parquet")
    fourth = run("2", cached, "2026-02-04", on)  # the worker that reads it logs a warning
    assert fourth.status == "committed"
    assert _stage(fourth, "preselect").cache_hits < n2  # the unreadable file's texts were computed again
    for table in TABLES:
        assert _rows(cached, table, "2026-02-04") == _rows(plain, table, "2026-02-02"), table

    # a cache table whose metadata cannot be read: the driver warns, the night runs without it
    broken = [n for n in cache_tables(catalog) if "token_premium" in n]
    for name in broken:
        Path(load_table(catalog, name).metadata_location.removeprefix("file://")).write_text("{broken")
    with caplog.at_level(logging.WARNING, logger="curate.cache"):
        fifth = run("2", cached, "2026-02-05", on)
    assert fifth.status == "committed"
    assert "cannot be read" in caplog.text and "runs without the cache tonight" in caplog.text
    assert _stage(fifth, "token_premium").cache_hits is None  # not cached tonight
    for table in TABLES:
        assert _rows(cached, table, "2026-02-05") == _rows(plain, table, "2026-02-02"), table

    # upkeep keeps the cache's files (referenced, or of a table it cannot read), even with no grace
    # period; the broken tables are reported, not fatal
    data = cached / "_data"
    before = {p for p in data.rglob("*.parquet") if p.parts[len(data.parts)].startswith("_cache_")}
    report = maintain(open_output(str(cached)), retain_days=0, grace_hours=0)
    after = {p for p in data.rglob("*.parquet") if p.parts[len(data.parts)].startswith("_cache_")}
    assert not [p for p in before - after if "token_premium" in str(p) or "preselect" in str(p)]
    assert all(name in report.summary() for name in broken)


def test_lm_stage_is_cached_by_default(tmp_path, local_ray, one_torch_thread):
    """The real lm stage (torch, a handful of short documents): repeated texts carry the stored values."""
    texts = ["The cat sat on the mat.", "Ray Data streams blocks.", "Iceberg tables have snapshots.",
             "A brand new sentence appears."]
    for night, rows in (("1", texts[:3]), ("2", texts[1:])):
        pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(rows))], "text": rows}),
                       _mkdir(tmp_path / night) / "part-0.parquet")
    out = tmp_path / "out"

    def run(night, date):
        raw = {"name": "lmcache", "input": {"url": str(tmp_path / night)}, "output": {"url": str(out)},
               "stages": [{"op": "lm", "model": {"name": "m", "path": str(DEMO / "smollm2-135m-instruct"),
                                                 "backend": "torch"},
                           "max_tokens": 16, "cpu_threads": 1, "resources": {"batch_size": 4}}]}
        return run_pipeline(parse_config(raw), date)

    assert _stage(run("1", "2026-04-01"), "lm_m").cache_hits == 0
    second = run("2", "2026-04-02")
    assert (_stage(second, "lm_m").cache_hits, _stage(second, "lm_m").cache_misses) == (2, 1)
    from jobs.ops.query import query

    cols = "text, m__token_ids, m__logprob, m__entropy, m__nll_sum, m__n_scored"
    one = {r["text"]: r for r in query(str(out), f"SELECT {cols} FROM documents", date="2026-04-01").to_pylist()}
    two = {r["text"]: r for r in query(str(out), f"SELECT {cols} FROM documents", date="2026-04-02").to_pylist()}
    for text in texts[1:3]:
        assert two[text] == one[text]  # the stored float32 lists and float64 sums, bit for bit
    assert two[texts[3]]["m__n_scored"] > 0
