"""Nothing lost by a bad night (issue 22): the shrink guard, and an error budget that counts lost rows."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_rows, table_rows, tiny_pipeline, write_shard

from jobs.cli.main import build_parser, main
from operators.base import RunFailed
from pipelines.config import ConfigError, parse_config
from pipelines.guards import ShrinkRefused, shrink_error
from pipelines.io import read_shard
from pipelines.runner import run_pipeline

DATE = "2026-01-01"


def docs(root: Path, n: int, name: str = "part-0.parquet") -> Path:
    """A shard of ``n`` distinct English documents (``n`` may be 0)."""
    return write_shard(root / name, id=pa.array([f"d{i}" for i in range(n)], pa.string()),
                       text=pa.array([f"Document number {i} of the night." for i in range(n)], pa.string()),
                       lang=pa.array(["eng_Latn"] * n, pa.string()))


def pipeline_file(tmp_path: Path, inputs: Path, out: Path, **extra) -> Path:
    raw = tiny_pipeline(str(inputs), str(out)) | extra
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------ shrink guard


def test_shrink_arithmetic():
    # (committed - new) / committed > 0.5 is refused; exactly half passes; 0 of anything is refused
    assert shrink_error(DATE, 40, 20, 20, 0.5) is None
    assert "from 40 committed rows to 19 (52% fewer, over output.max_shrink_share 0.5)" in \
        shrink_error(DATE, 40, 19, 19, 0.5)
    assert "from 40 committed rows to 0 (100% fewer" in shrink_error(DATE, 40, 0, 5, 1.0)  # 0 even at 1.0
    assert shrink_error(DATE, 0, 3, 3, 0.5) is None  # a first night
    assert "holds 0 rows" in shrink_error(DATE, 0, 0, 0, 0.5)  # an empty input is no night
    assert shrink_error(DATE, 40, 60, 60, 0.5) is None  # growing is fine


def test_a_rerun_that_would_wipe_or_halve_a_night_is_refused_before_its_commit(tmp_path, local_ray, capsys):
    out = tmp_path / "out"
    good = parse_config(tiny_pipeline(str(docs(tmp_path / "good", 40).parent), str(out)))
    assert run_pipeline(good, DATE).tables["documents"] == 40

    empty = docs(tmp_path / "empty", 0).parent  # one 0-row Parquet shard
    path = pipeline_file(tmp_path, tmp_path / "good", out)
    assert main(["run", str(path), "--date", DATE, "--input", str(empty)]) == 1
    captured = capsys.readouterr()
    assert ("curate: error: run failed, nothing committed: the input of 2026-01-01 holds 0 rows: nothing to "
            "commit (the committed night has 40 documents rows); pass --allow-shrink") in captured.err
    assert "committed in" not in captured.out
    assert len(table_rows(out, "documents", DATE)) == 40  # the good night is still what readers see

    docs(tmp_path / "few", 19)
    assert main(["run", str(path), "--date", DATE, "--input", str(tmp_path / "few")]) == 1
    assert ("refusing to replace 2026-01-01: documents would shrink from 40 committed rows to 19 (52% fewer, "
            "over output.max_shrink_share 0.5)") in capsys.readouterr().err
    assert len(table_rows(out, "documents", DATE)) == 40
    assert [r["status"] for r in run_rows(out)] == ["committed", "failed", "failed"]
    assert not list(out.glob("_data/documents/*/*/*.parquet"))[40:]  # refused runs' staged files are gone

    # a configured share lets 19 of 40 through; --allow-shrink lets an empty night through
    loose = {**tiny_pipeline(str(tmp_path / "few"), str(out))}
    loose["output"]["max_shrink_share"] = 0.6
    assert run_pipeline(parse_config(loose), DATE).tables["documents"] == 19
    assert main(["run", str(path), "--date", DATE, "--input", str(empty), "--allow-shrink"]) == 0
    printed = capsys.readouterr().out
    assert "committed" in printed and "report: none (2026-01-01 has no documents)" in printed
    assert table_rows(out, "documents", DATE) == []


def test_nightly_refuses_a_shrinking_rerun_naming_both_counts(tmp_path, local_ray, capsys):
    out = tmp_path / "out"
    docs(tmp_path / "crawl" / f"dt={DATE}", 4)
    path = pipeline_file(tmp_path, Path(f"{tmp_path}/crawl/dt={{date}}"), out)
    assert main(["nightly", str(path), "--date", DATE]) == 0
    docs(tmp_path / "crawl" / f"dt={DATE}", 1)  # the night's input lost 3 of its 4 documents
    assert main(["nightly", str(path), "--date", DATE, "--force"]) == 1
    assert "night 2026-01-01 FAILED: refusing to replace 2026-01-01: documents would shrink from 4 committed " \
           "rows to 1 (75% fewer" in capsys.readouterr().out
    assert len(table_rows(out, "documents", DATE)) == 4
    assert main(["nightly", str(path), "--date", DATE, "--force", "--allow-shrink"]) == 0
    assert len(table_rows(out, "documents", DATE)) == 1


def test_allow_shrink_is_offered_by_run_nightly_and_replay():
    parser = build_parser()
    for argv in (["run", "p.yaml"], ["nightly", "p.yaml"], ["quarantine", "replay", "p.yaml", "--date", DATE]):
        assert parser.parse_args([*argv, "--allow-shrink"]).allow_shrink is True
        assert parser.parse_args(argv).allow_shrink is False
    assert issubclass(ShrinkRefused, RunFailed)  # recorded as failed, nothing committed


# ------------------------------------------------------------------------- budget counts lost rows


def corrupt_first_row_group(path: Path, rows_per_group: int = 10, groups: int = 2) -> None:
    """Write ``groups`` row groups of distinct texts, then overwrite the middle of row group 0's
    compressed ``text`` chunk: its footer still declares ``rows_per_group`` rows."""
    n = rows_per_group * groups
    table = pa.table({"text": [f"row {i} " + "lorem ipsum " * (i + 3) for i in range(n)]})
    pq.write_table(table, path, row_group_size=rows_per_group, compression="zstd", use_dictionary=False)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = chunk.data_page_offset
    size = chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    data[start + 8:start + size - 2] = b"\xff" * (size - 10)
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_counts_the_rows_its_metadata_declares(tmp_path, local_ray):
    inputs = tmp_path / "in"
    docs(inputs, 10, "good.parquet")
    corrupt_first_row_group(inputs / "bad.parquet")
    records = [b for b in read_shard(str(inputs / "bad.parquet")) if b.column("quarantine_reason")[0].is_valid]
    assert [r.column("rows_lost").to_pylist() for r in records] == [[10]]

    raw = tiny_pipeline(str(inputs), str(tmp_path / "out"))
    result = run_pipeline(parse_config(raw), DATE)
    # in = 10 good + 10 readable of bad.parquet + 10 declared by the corrupt group; 1 record stands for 10
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (30, 20, 10)
    (run,) = run_rows(tmp_path / "out")
    assert json.loads(run["stages"])[0]["quarantined"] == 10 and run["rows_quarantined"] == 10

    strict = tiny_pipeline(str(inputs), str(tmp_path / "strict")) | {"max_quarantine_share": 0.3}
    with pytest.raises(RunFailed, match=r"the run quarantined 10 of 30 rows \(33%\), over max_quarantine_share"):
        run_pipeline(parse_config(strict), DATE)


def test_a_truncated_shard_is_an_unreadable_file_with_its_own_budget(tmp_path, local_ray, capsys):
    inputs = tmp_path / "in"
    docs(inputs, 10, "good.parquet")
    big = docs(inputs, 2000, "big.parquet")
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # cut in half: no footer
    out = tmp_path / "out"
    path = pipeline_file(tmp_path, inputs, out)
    assert main(["run", str(path), "--date", DATE]) == 1
    err = capsys.readouterr().err
    assert (f"error budget passed: 1 input file(s) could not be read at all (their rows cannot be counted), "
            f"over max_unreadable_files 0: {big}") in err
    assert table_rows(out, "documents") == []

    allowed = pipeline_file(tmp_path, inputs, out, max_unreadable_files=1)
    assert main(["run", str(allowed), "--date", DATE]) == 0
    assert len(table_rows(out, "documents", DATE)) == 10
    (q,) = table_rows(out, "quarantine", DATE)
    assert q["quarantine_reason"].startswith(f"unreadable Parquet file {big}")


# ------------------------------------------------------------------------------------------ smaller


@pytest.mark.parametrize("output", ["{in}", "{in}/out", "{in}/sub/out"])
def test_an_output_equal_to_or_inside_the_input_is_refused(tmp_path, output):
    inputs = tmp_path / "in"
    docs(inputs, 1)
    for url in (str(inputs), f"{inputs}/*.parquet"):
        with pytest.raises(ConfigError, match="the next night would read the output's own files as input"):
            parse_config(tiny_pipeline(url, output.format(**{"in": inputs})))
    parse_config(tiny_pipeline(str(inputs), f"{inputs}-out"))  # a sibling whose name starts alike is fine


@pytest.mark.parametrize("value", ["2026-W01-1", "20260101", "2026-1-1", "2026-01-01T00:00", "../x"])
def test_date_accepts_only_yyyy_mm_dd(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "p.yaml", "--date", value])
    assert f"not a date (YYYY-MM-DD): {value!r}" in capsys.readouterr().err
    assert build_parser().parse_args(["run", "p.yaml", "--date", "2026-01-31"]).date == "2026-01-31"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 16 MiB tmpfs (needs root; skipped where it cannot be mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros to ``disk`` until it is full; the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_mid_commit_is_one_line_and_the_committed_night_stays(tmp_path, small_disk, local_ray,
                                                                           monkeypatch, capsys):
    out = small_disk / "out"
    docs(tmp_path / "n1", 3)
    run_pipeline(parse_config(tiny_pipeline(str(tmp_path / "n1"), str(out))), DATE)
    docs(tmp_path / "n2", 5)
    path = pipeline_file(tmp_path, tmp_path / "n2", out)
    monkeypatch.setenv("CURATE_COMMIT_HOOK", "before:documents:sleep=6")  # the commit waits here

    def fill_when_finalized() -> None:  # finalize stages token_premium last, then the commit starts
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("_data/token_premium/run_date=2026-01-02/*/*")):
            time.sleep(0.05)
        fill(small_disk)

    filler = threading.Thread(target=fill_when_finalized, daemon=True)
    filler.start()
    rc = main(["run", str(path), "--date", "2026-01-02"])
    filler.join()
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("curate: error:"))
    assert line.startswith(f"curate: error: storage error under {out}: ")
    assert "No space left on device" in line and "this run committed nothing" in line

    (small_disk / "filler").unlink()
    assert len(table_rows(out, "documents", DATE)) == 3  # the committed night is intact
    assert table_rows(out, "documents", "2026-01-02") == []  # and nothing of the failed one shows
    monkeypatch.delenv("CURATE_COMMIT_HOOK")
    assert main(["run", str(path), "--date", "2026-01-02"]) == 0  # once there is space, the rerun commits
    assert len(table_rows(out, "documents", "2026-01-02")) == 5
