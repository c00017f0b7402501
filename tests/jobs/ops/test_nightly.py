"""``curate nightly``: input by date, the per-night lock, and catching up missed nights."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline, write_shard

from jobs.cli.main import main
from jobs.errors import UserError
from jobs.ops import nightly
from jobs.ops.query import query
from pipelines.lock import held_locks, run_lock
from pipelines.tables import open_output, runs_table

ROOT = Path(__file__).resolve().parents[3]
NIGHTS = ["2026-05-01", "2026-05-02", "2026-05-03", "2026-05-04"]


def write_night(inputs: Path, night: str) -> None:
    write_shard(inputs / f"dt={night}" / "part-0.parquet", id=[f"{night}-en", f"{night}-fr"],
                text=[f"Good night {night}", f"Bonne nuit {night}"], lang=["eng_Latn", "fra_Latn"])


@pytest.fixture
def nightly_pipeline(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny pipeline whose input is partitioned by date; returns (pipeline yaml, output dir)."""
    inputs, out = tmp_path / "crawl", tmp_path / "out"
    for night in NIGHTS:
        write_night(inputs, night)
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline(f"{inputs}/dt={{date}}", str(out), "tiny")))
    return path, out


def committed_runs(out: Path) -> list[tuple[str, int]]:
    rows = query(str(out), "SELECT run_date, count(*) AS n FROM runs WHERE status = 'committed' "
                           "GROUP BY 1 ORDER BY 1")
    return list(zip(rows["run_date"].to_pylist(), rows["n"].to_pylist(), strict=True))


# ------------------------------------------------------------------------------------ input


def test_date_is_substituted_in_the_input_url():
    assert nightly.night_url("s3://b/crawl/dt={date}/", "2026-05-02") == "s3://b/crawl/dt=2026-05-02/"
    assert nightly.night_url("/data/{date:%Y/%m/%d}/*.parquet", "2026-05-02") == "/data/2026/05/02/*.parquet"
    assert nightly.night_url("/data/all", "2026-05-02") == "/data/all"


def test_config_gets_the_nights_input(nightly_pipeline):
    path, _ = nightly_pipeline
    cfg = nightly.load_night_config(str(path), "2026-05-03")
    assert cfg.input.url.endswith("/crawl/dt=2026-05-03")


def test_date_range_rejects_reversed_dates():
    assert nightly.date_range("2026-02-27", "2026-03-01") == ["2026-02-27", "2026-02-28", "2026-03-01"]
    with pytest.raises(UserError, match="after the run date"):
        nightly.date_range("2026-03-02", "2026-03-01")


# ------------------------------------------------------------------------------------- lock
# (the lock itself: tests/pipelines/test_lock.py)


def test_nightly_refuses_while_the_night_is_locked(nightly_pipeline, capsys):
    path, out = nightly_pipeline
    catalog = open_output(str(out)).catalog(create=True)
    with run_lock(catalog, NIGHTS[0], run_id="elsewhere"):
        assert main(["nightly", str(path), "--date", NIGHTS[0]]) == 1
    printed = capsys.readouterr().out
    assert "already going" in printed and "run elsewhere (pid" in printed
    assert runs_table(catalog).scan().to_arrow().num_rows == 0  # nothing ran, nothing recorded


# --------------------------------------------------------------------------------- catch-up


def test_since_runs_exactly_the_missed_nights(nightly_pipeline, local_ray, capsys):
    path, out = nightly_pipeline
    assert main(["nightly", str(path), "--date", NIGHTS[0]]) == 0
    assert main(["nightly", str(path), "--date", NIGHTS[2]]) == 0  # the night of NIGHTS[1] was missed
    capsys.readouterr()

    assert main(["nightly", str(path), "--since", NIGHTS[0], "--date", NIGHTS[3]]) == 0
    out_text = capsys.readouterr().out
    assert f"running 2 night(s): {NIGHTS[1]}, {NIGHTS[3]}" in out_text
    assert committed_runs(out) == [(n, 1) for n in NIGHTS]  # no night ran twice
    ids = query(str(out), "SELECT run_date, id FROM documents ORDER BY 2")
    assert ids["id"].to_pylist() == sorted(f"{n}-{lang}" for n in NIGHTS for lang in ("en", "fr"))
    assert all(i.startswith(d) for d, i in zip(ids["run_date"].to_pylist(), ids["id"].to_pylist(),
                                               strict=True))  # each night read its own input
    assert held_locks(open_output(str(out)).catalog()) == {}  # every lock released

    assert main(["nightly", str(path), "--since", NIGHTS[0], "--date", NIGHTS[3]]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert committed_runs(out) == [(n, 1) for n in NIGHTS]


def test_a_failed_night_is_retried_by_the_next_catch_up(nightly_pipeline, local_ray, capsys):
    path, out = nightly_pipeline
    late = "2026-05-05"  # its input has not arrived yet
    assert main(["nightly", str(path), "--since", NIGHTS[3], "--date", late]) == 1
    assert f"night {late} FAILED: input not found" in capsys.readouterr().out
    assert committed_runs(out) == [(NIGHTS[3], 1)]  # the night before still ran
    failed = query(str(out), "SELECT run_date FROM runs WHERE status = 'failed'")
    assert failed["run_date"].to_pylist() == [late]

    write_night(path.parent / "crawl", late)
    assert main(["nightly", str(path), "--since", NIGHTS[3], "--date", late]) == 0
    assert committed_runs(out) == [(NIGHTS[3], 1), (late, 1)]
    assert (out / "reports" / f"run_date={late}" / "report.html").exists()
