"""The result cache's keys (no Ray): content hashes, stage fingerprints, the runner's bookkeeping,
the append that adds a key once, and expiry."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pytest

from operators.membership.lowercase import LowercaseTextConfig
from operators.token_premium.stage import TokenCountsConfig
from pipelines import cache_stage
from pipelines.cache import (
    KEY_COLUMN,
    CachedStage,
    CachePlan,
    commit_cache,
    content_keys,
    expire_cache,
    load_table,
    table_name,
)
from pipelines.cache_stage import HIT, ROW, RUN, STATE, CachedStageRunner, col_name, one_match_each
from pipelines.fingerprint import file_sha256, plan_fingerprints, stage_fingerprint
from pipelines.staging import stage_rows
from pipelines.tables import open_output

CL100K = {"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"}


def test_content_key_is_sha256_of_the_utf8_text():
    keys = content_keys(pa.array(["héllo", None]))
    assert keys.to_pylist() == [hashlib.sha256("héllo".encode()).hexdigest(), None]


def _hf_stage(path: str, **kw) -> TokenCountsConfig:
    return TokenCountsConfig(tokenizers=[{"name": "t", "kind": "hf", "path": path}], **kw)


def test_a_changed_file_config_field_or_version_changes_the_fingerprint(tmp_path, monkeypatch):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"v": 1}')
    base = stage_fingerprint(_hf_stage(str(tok)), {})
    assert stage_fingerprint(_hf_stage(str(tok)), {}) == base  # deterministic
    # fields that never change a row's output: resources, finalize-only settings, the stage name
    assert stage_fingerprint(_hf_stage(str(tok), resources={"batch_size": 7, "concurrency": 2},
                                       ref_lang="fra_Latn", max_unk_share=0.5, name="tp2"), {}) == base
    # a config field that changes the output
    other = TokenCountsConfig(tokenizers=[{"name": "t", "kind": "tiktoken", "encoding": "o200k_base"}])
    assert stage_fingerprint(other, {}) != base
    # the model file's content
    (tok / "tokenizer.json").write_text('{"v": 2}')
    changed = stage_fingerprint(_hf_stage(str(tok)), {})
    assert changed != base
    # same bytes again: the same fingerprint (content, not mtime, decides)
    (tok / "tokenizer.json").write_text('{"v": 1}')
    assert stage_fingerprint(_hf_stage(str(tok)), {}) == base
    # the operator's version constant
    monkeypatch.setattr(TokenCountsConfig, "cache_version", 2)
    assert stage_fingerprint(_hf_stage(str(tok)), {}) != base


def test_file_hash_is_remembered_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    known: dict = {}
    assert file_sha256(f, known) == hashlib.sha256(b"abc").hexdigest()
    # same size and mtime: the remembered hash is used (no rehash of multi-GB weights)
    stat = f.stat()
    f.write_bytes(b"xyz")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(f, known) == hashlib.sha256(b"abc").hexdigest()
    # a rewrite that moves the mtime is hashed again
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_sha256(f, known) == hashlib.sha256(b"xyz").hexdigest()


def test_a_stage_keys_on_the_stages_it_reads_from(tmp_path, monkeypatch):
    from operators.lm.stage import LMStageConfig

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    lower = LowercaseTextConfig()
    lm = LMStageConfig(model={"name": "m", "path": str(model)}, text_column="text_lower")
    before = plan_fingerprints([lower, lm], {lm.stage_name})[lm.stage_name]
    monkeypatch.setattr(LowercaseTextConfig, "cache_version", 9)
    assert plan_fingerprints([lower, lm], {lm.stage_name})[lm.stage_name] != before
    # a column no earlier stage makes (an input column): the text does not decide it, never cached
    assert plan_fingerprints([lm], {lm.stage_name}) == {lm.stage_name: None}


def _entry(columns=("n_bytes", "n_chars", "tokens__cl100k", "fallback_chars__cl100k", "unk_chars__cl100k"),
           schema=None) -> CachedStage:
    schema = schema or pa.schema([(KEY_COLUMN, pa.string())])
    return CachedStage("token_premium", "_cache_tp_0123456789abcdef", "0" * 64, tuple(columns), (), schema)


def test_runner_serves_hits_and_computes_each_distinct_text_once():
    stage = TokenCountsConfig(tokenizers=[CL100K])
    cached_schema = pa.schema([(KEY_COLUMN, pa.string()), ("n_bytes", pa.int64()), ("n_chars", pa.int64()),
                               ("tokens__cl100k", pa.int64()), ("fallback_chars__cl100k", pa.int64()),
                               ("unk_chars__cl100k", pa.int64()), ("run_id", pa.string()),
                               ("run_date", pa.string())])
    entry = _entry(schema=cached_schema)
    runner = CachedStageRunner(stage, entry)
    seen = []
    process = runner.operator.process
    runner.operator.process = lambda rows: seen.extend(rows.column("text").to_pylist()) or process(rows)
    texts = ["Hello world", "dup text", "dup text", "cached one", "bad"]
    batch = pa.table({"text": texts, "quarantine_reason": [None, None, None, None, "read failed"],
                      "quarantine_stage": [None, None, None, None, "read"]})
    batch = cache_stage.add_keys(batch)
    hit = [False, False, False, True, False]
    # the cached row holds deliberately "wrong" numbers: a hit must carry them, never recompute
    cached = {"n_bytes": 999, "n_chars": 998, "tokens__cl100k": 997, "fallback_chars__cl100k": 0,
              "unk_chars__cl100k": 0}
    batch = batch.append_column(HIT + entry.table, pa.array([h or None for h in hit], pa.bool_()))
    batch = batch.append_column(RUN + entry.table, pa.array(["r0" if h else None for h in hit]))
    for name, value in cached.items():
        batch = batch.append_column(col_name(entry, name), pa.array([value if h else None for h in hit], pa.int64()))
    out = runner(batch)
    assert seen == ["Hello world", "dup text"]  # the duplicate and the hit were not computed
    rows = out.to_pylist()
    assert [r["n_chars"] for r in rows] == [11, 8, 8, 998, None]
    assert [r["tokens__cl100k"] for r in rows[:4]] == [2, 2, 2, 997]
    assert out.column(STATE + entry.table).to_pylist() == [2, 2, 3, 1, 0]  # new, new, copy, hit, not run
    assert not [c for c in out.column_names if c.startswith(("__cache_hit", "__cache_run", "__cache_col"))]
    assert out.schema.field("n_chars").type == pa.int64()


def test_one_match_each_keeps_the_earliest_runs_entry():
    entry = _entry()
    batch = pa.table({ROW: ["a", "a", "b"], RUN + entry.table: ["r2", "r1", "r1"], "v": [2, 1, 3]})
    assert one_match_each(batch, entry).column("v").to_pylist() == [1, 3]


def _stage_entries(output, table, run_id, keys):
    rows = pa.table({KEY_COLUMN: keys, "n_chars": [len(k) for k in keys], "run_id": [run_id] * len(keys)})
    return stage_rows(output, table, "2026-01-01", run_id, "part-0", rows)


def test_two_nights_adding_the_same_key_at_once_add_it_once(tmp_path):
    output = open_output(str(tmp_path / "out"))
    catalog = output.catalog(create=True)
    table = table_name("tp", "f" * 64)
    entry = CachedStage("tp", table, "f" * 64, ("n_chars",), (), pa.schema([(KEY_COLUMN, pa.string())]))
    # both nights planned against the same (empty) cache, then commit one after the other
    plan_a = CachePlan({"tp": entry}, output)
    plan_b = CachePlan({"tp": entry}, output)
    commit_cache(catalog, plan_a, [_stage_entries(output, table, "run-a", ["k1", "k2"])])
    added = commit_cache(catalog, plan_b, [_stage_entries(output, table, "run-b", ["k2", "k3"])])
    assert added == {table: 1}  # k2 was added by the other night meanwhile
    keys = sorted(load_table(catalog, table).scan().to_arrow().column(KEY_COLUMN).to_pylist())
    assert keys == ["k1", "k2", "k3"]


def test_expiry_removes_entries_neither_made_nor_used_since_the_cutoff(tmp_path):
    from datetime import UTC, datetime

    from pipelines.cache import USED_SCHEMA, USED_TABLE

    output = open_output(str(tmp_path / "out"))
    catalog = output.catalog(create=True)
    table = table_name("tp", "e" * 64)
    plan = CachePlan({}, output)

    def entries(date, keys):
        rows = pa.table({KEY_COLUMN: keys, "n_chars": [1] * len(keys), "run_id": ["r"] * len(keys)})
        return stage_rows(output, table, date, "r-" + date, "part-0", rows)

    def used(date, keys):
        rows = pa.table([pa.array([table] * len(keys)), pa.array(keys)], schema=USED_SCHEMA)
        return stage_rows(output, USED_TABLE, date, "r-" + date, "used", rows)

    commit_cache(catalog, plan, [entries("2026-01-01", ["old", "old-used"]), used("2026-01-01", ["old"])])
    commit_cache(catalog, plan, [entries("2026-01-09", ["new"]), used("2026-01-09", ["old-used"])])
    now = datetime(2026, 1, 12, tzinfo=UTC)
    dry = expire_cache(catalog, output, 5, now, dry_run=True)
    assert dry.removed == {table: 1} and dry.kept == {table: 2}
    assert len(load_table(catalog, table).scan().to_arrow()) == 3  # a dry run removes nothing
    report = expire_cache(catalog, output, 5, now)
    assert report.cutoff == "2026-01-07" and report.removed == {table: 1}
    keys = sorted(load_table(catalog, table).scan().to_arrow().column(KEY_COLUMN).to_pylist())
    assert keys == ["new", "old-used"]  # made 01-01 but used 01-09: kept; made 01-01, unused: gone
    assert load_table(catalog, USED_TABLE).scan().to_arrow().column("run_date").to_pylist() == ["2026-01-09"]


@pytest.mark.parametrize("rows, partitions", [(None, 64), (1000, 4), (1, 1)])
def test_join_partitions_hold_about_a_batch(rows, partitions):
    assert CachePlan({}, open_output("/tmp/x"), rows).partitions(256) == partitions
