"""Each stage's timing, folded over batches and writers: compute seconds summed, build seconds summed
over actors, the window from the first batch's start to the last one's end."""

from __future__ import annotations

import json

import pyarrow as pa

from jobs.ops.summary import format_summary
from pipelines.runner import RunResult, stage_stats
from pipelines.stage_runner import fold_timing, merge_timing, timing_column


def batch(stage: str, seconds: float, build: float, began: float, ended: float, rows: int = 4) -> pa.Table:
    values = {"seconds": seconds / rows, "build": build / rows, "began": began, "ended": ended}
    return pa.table({timing_column(kind, stage): [value] * rows for kind, value in values.items()})


def test_fold_and_merge_by_hand():
    a = fold_timing(batch("lm", seconds=2.0, build=8.0, began=100.0, ended=102.0))
    assert a == {"lm": {"seconds": 2.0, "build": 8.0, "began": 100.0, "ended": 102.0}}
    b = fold_timing(batch("lm", seconds=3.0, build=0.0, began=102.5, ended=105.5))
    merge_timing(a, b)
    assert a == {"lm": {"seconds": 5.0, "build": 8.0, "began": 100.0, "ended": 105.5}}
    merge_timing(a, fold_timing(batch("scores", 0.5, 0.1, 106.0, 106.5)))
    assert a["scores"]["ended"] == 106.5 and a["lm"]["ended"] == 105.5


def test_stage_stats_windows_are_seconds_after_the_run_started():
    rows = [{"rows": 4, "quarantined_by": "{}",
             "timing_by": json.dumps({"lm": {"seconds": 2.0, "build": 8.0, "began": 1010.0, "ended": 1012.0}})},
            {"rows": 4, "quarantined_by": json.dumps({"lm": 1}),
             "timing_by": json.dumps({"lm": {"seconds": 3.0, "build": 0.0, "began": 1012.5, "ended": 1015.5}})}]
    read, lm = stage_stats(rows, ["lm"], started=1000.0)
    assert (read.rows_in, read.began_s, read.build_seconds) == (8, None, 0.0)
    assert (lm.rows_in, lm.rows_out, lm.quarantined) == (8, 7, 1)
    assert (lm.seconds, lm.build_seconds, lm.began_s, lm.ended_s) == (5.0, 8.0, 10.0, 15.5)
    text = format_summary(RunResult("r", "2026-01-01", "committed", "out", stages=[read, lm], seconds=20.0))
    lm_line = next(line for line in text.splitlines() if line.startswith("lm "))
    assert "load s" in text and lm_line.endswith("8.0  10-16")
