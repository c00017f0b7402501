"""Issue 13, input side (probes 5-8): shard reading quarantines rows, not shards; types are checked
up front; quarantine keeps the content; input columns are decoded, found, renamed, de-duplicated;
``curate quarantine replay`` reruns a night's quarantined rows."""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_rows, table_rows, tiny_pipeline, write_shard

from jobs.cli.main import main
from pipelines.config import ConfigError, parse_config
from pipelines.io import InputError, list_shards, read_shard
from pipelines.runner import read_tasks, run_pipeline

DATE = "2026-02-01"
#: FLORES-200 dev, shn_Mymr line 838 holds U+0008 (a backspace) inside real text.
SHAN_WITH_BACKSPACE = "ၵႃႈၽၢၼ်ႇ\x08ၵႂၢမ်း ၼႂ်းမိူင်း"


def bad_utf8(*values: bytes) -> pa.Array:
    """A string column whose bytes are not all valid UTF-8 (as a broken writer makes it)."""
    return pa.array(list(values), pa.binary()).view(pa.string())


def run(tmp_path, corpus, **input_cfg):
    out = tmp_path / "out"
    raw = tiny_pipeline(str(corpus), str(out))
    raw["input"].update(input_cfg)
    raw["max_quarantine_share"] = 1.0
    result = run_pipeline(parse_config(raw), DATE)
    assert result.rows_in == result.rows_out + result.rows_quarantined
    assert all(s.rows_in == s.rows_out + s.quarantined for s in result.stages)
    return result, table_rows(out, "quarantine", DATE), table_rows(out, "documents", DATE)


def test_an_unreadable_value_quarantines_its_row_not_its_shard(tmp_path, local_ray):
    """Probe 5: invalid UTF-8 in a string column, a list-typed id: those rows, naming file/row/column."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    utf8 = corpus / "utf8.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"],
                             "text": bad_utf8(b"fine one", b"bad \xff text", b"fine two", b"fine three"),
                             "lang": bad_utf8(b"eng_Latn", b"eng_Latn", b"eng_Latn", b"\xfe")}), utf8)
    listy = corpus / "listy.parquet"
    pq.write_table(pa.table({"id": [[1], None], "text": ["list id", "null id is fine"]}), listy)
    result, quarantine, docs = run(tmp_path, corpus)
    assert sorted(d["text"] for d in docs) == ["fine one", "fine two", "null id is fine"]
    reasons = {(q["source_file"], q["source_row"]): q["quarantine_reason"] for q in quarantine}
    assert reasons == {
        (str(utf8), 1): f"invalid UTF-8 at byte 4 in column 'text' ({utf8} row 1)",
        (str(utf8), 3): f"column 'lang' holds invalid UTF-8 b'\\xfe' ({utf8} row 3)",
        (str(listy), 0): f"column 'id' has type list<element: int64>, expected a string or integer "
                         f"(value [1]) ({listy} row 0)",
    }
    assert result.rows_in == 6 and result.rows_quarantined == 3


def test_conflicting_column_types_fail_before_compute_naming_shard_and_column(tmp_path):
    """Probe 6: label int8 in one shard and string in another: a clear error, no Ray, a failed runs row."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    pq.write_table(pa.table({"text": ["one"], "label": pa.array([1], pa.int8())}), corpus / "a.parquet")
    write_shard(corpus / "b.parquet", text=["two"], label=["spam"])
    cfg = parse_config(tiny_pipeline(str(corpus), str(tmp_path / "out")))
    with pytest.raises(InputError, match=rf"shard {corpus / 'b.parquet'}: column 'label' has type string, "
                                         rf"but int8 in {corpus / 'a.parquet'}"):
        run_pipeline(cfg, DATE)
    (row,) = run_rows(tmp_path / "out")
    assert row["status"] == "failed" and "column 'label'" in row["error"]


def test_column_type_conflicting_with_the_committed_table_fails_up_front(tmp_path, local_ray):
    corpus = tmp_path / "in"
    write_shard(corpus / "a.parquet", text=["one"], label=[1])
    run(tmp_path, corpus)
    write_shard(corpus / "a.parquet", text=["one"], label=["spam"])
    with pytest.raises(InputError, match=rf"shard {corpus / 'a.parquet'}: column 'label' has type string, "
                                         r"but the documents table has int64"):
        run(tmp_path, corpus)


def test_quarantine_keeps_the_content_and_control_characters_are_data(tmp_path, local_ray):
    """Probe 7: the FLORES line with U+0008 is kept (counted); quarantined rows keep text or raw bytes."""
    corpus = tmp_path / "in"
    write_shard(corpus / "flores.parquet", text=[SHAN_WITH_BACKSPACE, "x" * 101])
    pq.write_table(pa.table({"text": pa.array([b"raw \xff bytes"], pa.binary())}), corpus / "bin.parquet")
    _, quarantine, docs = run(tmp_path, corpus, max_text_bytes=100)
    (shan,) = docs
    assert shan["text"] == SHAN_WITH_BACKSPACE and shan["n_control_chars"] == 1
    assert "text_bytes" not in shan
    kept = {q["source_file"].rsplit("/", 1)[1]: q for q in quarantine}
    assert kept["flores.parquet"]["text"] == "x" * 101 and kept["flores.parquet"]["source_row"] == 1
    assert kept["bin.parquet"]["text"] is None and kept["bin.parquet"]["text_bytes"] == b"raw \xff bytes"
    assert all(q["quarantine_stage"] == "read" for q in quarantine)


def test_control_chars_strip_and_quarantine(tmp_path):
    shard = write_shard(tmp_path / "c.parquet", text=["a\x08b", "plain"])
    (stripped,) = read_shard(str(shard), control_chars="strip")
    assert stripped.column("text").to_pylist() == ["ab", "plain"]
    assert stripped.column("n_control_chars").to_pylist() == [1, 0]
    (held,) = read_shard(str(shard), control_chars="quarantine")
    assert held.column("text").to_pylist() == ["a\x08b", "plain"]  # kept in the quarantine row
    assert held.column("quarantine_reason").to_pylist() == [
        f"control character U+0008 at offset 1 ({shard} row 0)", None]
    raw = tiny_pipeline("/x", "/y")
    raw["input"]["control_chars"] = "drop"
    with pytest.raises(ConfigError, match=r"input\.control_chars: Input should be 'keep', 'strip' or 'quarantine'"):
        parse_config(raw)


def test_input_columns_decoded_renamed_and_duplicates_warned(tmp_path, local_ray, caplog):
    """Probe 8: categorical text decoded; colliding columns renamed with a warning; duplicate
    (id, lang) rows warned about and counted once (the first by source_file, source_row)."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    pd.DataFrame({"id": ["p1", "p1"], "lang": ["eng_Latn", "fra_Latn"],
                  "text": pd.Categorical(["Hello world", "Bonjour le monde"]),
                  "source_file": ["crawl-7.warc", "crawl-7.warc"],
                  "quarantine_reason": ["upstream flag", None]}).to_parquet(corpus / "a.parquet")
    write_shard(corpus / "b.parquet", id=["p1"], lang=["fra_Latn"], text=["Bonjour le monde entier, encore"],
                source_file=["crawl-8.warc"], quarantine_reason=[None])
    with caplog.at_level(logging.WARNING):
        _, quarantine, docs = run(tmp_path, corpus)
    assert not quarantine
    assert sorted(d["text"] for d in docs) == ["Bonjour le monde", "Bonjour le monde entier, encore",
                                               "Hello world"]
    assert sorted(d["input_source_file"] for d in docs) == ["crawl-7.warc", "crawl-7.warc", "crawl-8.warc"]
    assert {d["input_quarantine_reason"] for d in docs} == {"upstream flag", None}
    assert {d["source_file"] for d in docs} == {str(corpus / "a.parquet"), str(corpus / "b.parquet")}
    assert "source_file -> input_source_file, quarantine_reason -> input_quarantine_reason" in caplog.text
    assert "1 duplicate (id, lang) row(s)" in caplog.text
    premium = {r["lang"]: r for r in table_rows(tmp_path / "out", "token_premium", DATE)}
    assert premium["fra_Latn"]["docs"] == 1
    assert premium["fra_Latn"]["chars"] == len("Bonjour le monde")  # a.parquet's row comes first


def test_glob_under_hidden_directories_finds_the_shards(tmp_path):
    root = tmp_path / ".cache" / "_work" / "corpus"
    write_shard(root / "a.parquet", text=["x"])
    write_shard(root / "_skip" / "b.parquet", text=["y"])
    write_shard(root / "sub" / "c.parquet", text=["z"])
    assert list_shards(f"{root}/**/*.parquet") == [str(root / "a.parquet"), str(root / "sub" / "c.parquet")]
    assert list_shards(str(root)) == [str(root / "a.parquet"), str(root / "sub" / "c.parquet")]


def test_quarantine_replay_reruns_a_night_through_the_current_pipeline(tmp_path, local_ray, capsys):
    corpus, out = tmp_path / "in", tmp_path / "out"
    write_shard(corpus / "a.parquet", id=["s1", "ok", "bad"], lang=["shn_Mymr", "eng_Latn", "eng_Latn"],
                text=[SHAN_WITH_BACKSPACE, "Fine text.", "   "])
    raw = tiny_pipeline(str(corpus), str(out))
    raw["input"]["control_chars"] = "quarantine"
    raw["max_quarantine_share"] = 1.0
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    assert main(["run", str(pipeline), "--date", DATE]) == 0
    night = {q["id"]: q for q in table_rows(out, "quarantine", DATE)}
    assert night["s1"]["text"] == SHAN_WITH_BACKSPACE  # the quarantined row keeps its text

    raw["input"]["control_chars"] = "keep"  # the fix: control characters are data
    pipeline.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["quarantine", "replay", "--date", DATE, str(pipeline)]) == 0
    printed = capsys.readouterr().out
    replays = out / "replays" / DATE
    assert f"replay of {DATE}: 2 quarantined row(s) in, 1 out, 1 still quarantined; tables under {replays}" \
        in printed
    (fixed,) = table_rows(replays, "documents", DATE)
    assert fixed["id"] == "s1" and fixed["text"] == SHAN_WITH_BACKSPACE and fixed["n_control_chars"] == 1
    assert fixed["input_source_file"] == str(corpus / "a.parquet") and fixed["input_source_row"] == 0
    assert fixed["input_quarantine_reason"].startswith("control character U+0008")
    (still,) = table_rows(replays, "quarantine", DATE)
    assert still["id"] == "bad" and "whitespace" in still["quarantine_reason"]
    assert len(table_rows(out, "documents", DATE)) == 1  # the night itself is untouched


def test_shards_read_at_once_default_to_one_per_four_cpus(tmp_path):
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))
    assert [read_tasks(parse_config(raw), cpus) for cpus in (1, 2, 4, 7, 64)] == [1, 1, 1, 1, 16]
    raw["input"]["read_tasks"] = 3
    assert read_tasks(parse_config(raw), 2) == 3
    raw["input"]["read_tasks"] = 0
    with pytest.raises(ConfigError, match="input.read_tasks"):
        parse_config(raw)
