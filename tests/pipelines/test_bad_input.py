"""Bad input, one test each: a clear message naming file/row/field, quarantine, reconciled counts."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_rows, table_rows, tiny_pipeline, write_shard

from pipelines.config import ConfigError, parse_config
from pipelines.io import InputError
from pipelines.runner import check_cpu_budget, run_pipeline


def run(tmp_path, corpus, date="2026-02-01"):
    """Run the tiny pipeline; return (result, quarantine rows, documents rows)."""
    out = tmp_path / "out"
    raw = tiny_pipeline(str(corpus), str(out))
    raw["max_quarantine_share"] = 1.0  # tiny corpora, mostly bad on purpose: no error budget here
    raw["max_unreadable_files"] = 1  # one test reads a file that is no Parquet at all
    result = run_pipeline(parse_config(raw), date)
    stages = result.stages
    assert all(s.rows_in == s.rows_out + s.quarantined for s in stages)
    assert result.rows_in == result.rows_out + result.rows_quarantined
    runs = run_rows(out)[-1]
    assert sum(s["quarantined"] for s in json.loads(runs["stages"])) == runs["rows_quarantined"]

    return result, table_rows(out, "quarantine", date), table_rows(out, "documents", date)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "in"
    write_shard(root / "good.parquet", text=["A perfectly fine document."])
    return root


def test_corrupt_parquet_file(tmp_path, corpus, local_ray):
    (corpus / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    result, quarantine, docs = run(tmp_path, corpus)
    assert len(docs) == 1
    (q,) = quarantine
    assert q["quarantine_reason"].startswith(f"unreadable Parquet file {corpus / 'broken.parquet'}")
    assert result.rows_quarantined == 1


def test_shard_without_text_column(tmp_path, corpus, local_ray):
    write_shard(corpus / "notext.parquet", body=["a", "b"])
    result, quarantine, docs = run(tmp_path, corpus)
    assert len(quarantine) == 2 and len(docs) == 1
    assert quarantine[0]["quarantine_reason"].startswith(
        f"shard {corpus / 'notext.parquet'} has no 'text' column (columns: body)")


def test_null_empty_and_whitespace_text(tmp_path, corpus, local_ray):
    write_shard(corpus / "blank.parquet", text=[None, "", " \t\n"])
    _, quarantine, _ = run(tmp_path, corpus)
    reasons = sorted(q["quarantine_reason"] for q in quarantine)
    assert reasons == [f"empty or whitespace-only text ({corpus / 'blank.parquet'} row 1)",
                       f"empty or whitespace-only text ({corpus / 'blank.parquet'} row 2)",
                       f"null text ({corpus / 'blank.parquet'} row 0)"]


def test_invalid_utf8_and_control_characters(tmp_path, corpus, local_ray):
    """Invalid UTF-8 is quarantined with its raw bytes; a control character is data (kept, counted)."""
    pq.write_table(pa.table({"text": pa.array([b"ok bytes", b"bad \xff\xfe", b"bell \x07"], pa.binary())}),
                   corpus / "bytes.parquet")
    _, quarantine, docs = run(tmp_path, corpus)
    assert sorted(d["text"] for d in docs) == ["A perfectly fine document.", "bell \x07", "ok bytes"]
    assert {d["text"]: d["n_control_chars"] for d in docs}["bell \x07"] == 1
    (q,) = quarantine
    assert q["quarantine_reason"] == f"invalid UTF-8 at byte 4 in column 'text' ({corpus / 'bytes.parquet'} row 1)"
    assert q["text_bytes"] == b"bad \xff\xfe"


def test_five_megabyte_document_is_processed(tmp_path, corpus, local_ray):
    big = ("All work and no play makes a dull corpus. " * 125_000)[:5_000_000]
    write_shard(corpus / "big.parquet", text=[big])
    result, quarantine, docs = run(tmp_path, corpus)
    assert not quarantine
    (row,) = [d for d in docs if d["n_chars"] == 5_000_000]
    assert row["tokens__cl100k"] > 1_000_000


def test_document_over_the_size_limit_is_quarantined(tmp_path, corpus, local_ray):
    raw = tiny_pipeline(str(corpus), str(tmp_path / "out"))
    raw["input"]["max_text_bytes"] = 100
    write_shard(corpus / "long.parquet", text=["x" * 101])
    result = run_pipeline(parse_config(raw), "2026-02-01")
    q = table_rows(tmp_path / "out", "quarantine")
    assert q[0]["quarantine_reason"].startswith("text is 101 bytes, over input.max_text_bytes=100")
    assert result.rows_out == 1


def test_wrong_column_type(tmp_path, corpus, local_ray):
    write_shard(corpus / "ints.parquet", text=[1, 2, 3])
    _, quarantine, _ = run(tmp_path, corpus)
    assert len(quarantine) == 3
    assert quarantine[0]["quarantine_reason"] == (
        f"column 'text' in {corpus / 'ints.parquet'} has type int64, expected string")


def test_empty_input_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = parse_config(tiny_pipeline(str(tmp_path / "empty"), str(tmp_path / "out")))
    with pytest.raises(InputError, match=f"input {tmp_path / 'empty'} holds no .parquet files"):
        run_pipeline(cfg, "2026-02-01")
    runs = run_rows(tmp_path / "out")
    assert runs[0]["status"] == "failed" and "holds no .parquet files" in runs[0]["error"]


def test_bad_config_names_field(tmp_path):
    raw = tiny_pipeline("/x", "/y")
    raw["stages"][0]["tokenizers"][0]["kind"] = "wordpiece"
    with pytest.raises(ConfigError, match=r"stages\.0\.token_premium\.tokenizers\.0\.kind: Input should be"):
        parse_config(raw)


def test_missing_tokenizer_file_fails_the_run_naming_the_path(tmp_path, local_ray):
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))  # an output inside the input is refused
    raw["stages"][0]["tokenizers"] = [{"name": "bad", "kind": "hf", "path": str(tmp_path / "missing.json")}]
    write_shard(tmp_path / "in" / "in.parquet", text=["x"])
    with pytest.raises(Exception, match="tokenizer file not found"):
        run_pipeline(parse_config(raw), "2026-02-01")


def test_stages_that_cannot_all_start_fail_before_running(tmp_path, local_ray):
    """Two 1-CPU stages + read + writer need 2.5 CPUs of the 2-CPU Ray: a ConfigError, not a hang."""
    write_shard(tmp_path / "in" / "a.parquet", text=["x"])
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))
    raw["stages"].append({**raw["stages"][0], "name": "again", "resources": {"num_cpus": 1.0}})
    with pytest.raises(ConfigError, match=r"reserve 2\.5 CPUs .*stages\[1\] again: 1 × 1.* has 2"):
        run_pipeline(parse_config(raw), "2026-02-01")
    check_cpu_budget(parse_config(raw), 2.0, autoscaling=True)  # a cluster that may grow: a warning


def test_tokenizer_that_does_not_match_its_model_fails_naming_the_model(tmp_path, local_ray):
    """A model dir whose tokenizer came from another model (49 152 ids for 32 logits)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from jobs.demo.model import prepare_demo_model

    model_dir = tmp_path / "mismatched"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(prepare_demo_model(log=lambda _m: None)).save_pretrained(model_dir)
    write_shard(tmp_path / "in" / "a.parquet", text=["Some text to score."])
    raw = {"name": "mismatch", "input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")},
           "stages": [{"op": "lm", "model": {"name": "m", "path": str(model_dir)}}]}
    with pytest.raises(Exception, match=rf"model 'm' at {model_dir}: its tokenizer does not match the model: "
                                        r"the tokenizer has 49152 ids but the model only 32 logits"):
        run_pipeline(parse_config(raw), "2026-02-01")
    runs = run_rows(tmp_path / "out")
    assert runs[0]["status"] == "failed" and "does not match the model" in runs[0]["error"]
