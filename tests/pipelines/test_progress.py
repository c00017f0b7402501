"""What a person sees during a run: progress lines off a terminal, Ray's own logs only with ``-v``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import tiny_pipeline

from pipelines.progress import ProgressBoard, ProgressReporter, format_duration, progress_line

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["token_premium", "preselect", "lm_smollm2", "scores_smollm2"]
RAY_FLOOD = ("Execution plan of Dataset", "Starting execution of Dataset", "logging_progress",
             "Started a local Ray instance")


def test_durations():
    assert [format_duration(s) for s in (0, 7.4, 127, 3840)] == ["0s", "7s", "2m07s", "1h04m"]


def test_line_names_the_stage_the_run_waits_on_with_rate_and_eta():
    done = {"token_premium": 840, "preselect": 840, "lm_smollm2": 320, "scores_smollm2": 300}
    # lm is the earliest stage with rows to do (840 - 320); 320 rows in 78 s = 4.1 rows/s,
    # 520 rows left at that rate = 126.75 s
    assert progress_line(STAGES, done, 840, 78.0) == \
        "progress: lm_smollm2 (stage 3/4) 320/840 rows, 4.1 rows/s, ETA 2m07s"
    # scores has more rows waiting (512) than lm (328), but gets them only when lm's block is done:
    # the line stays on lm, not on "scores 0/840, ETA ?"
    blocked = {"token_premium": 840, "preselect": 840, "lm_smollm2": 512, "scores_smollm2": 0}
    assert progress_line(STAGES, blocked, 840, 128.0) == \
        "progress: lm_smollm2 (stage 3/4) 512/840 rows, 4.0 rows/s, ETA 1m22s"
    assert progress_line(STAGES, {}, 840, 3.0) is None
    assert progress_line(STAGES, dict.fromkeys(STAGES, 840), 840, 130.0) == \
        "progress: all 4 stages done, 840/840 rows in 2m10s"
    unknown_total = {"token_premium": 10, "preselect": 10, "lm_smollm2": 4}
    assert progress_line(STAGES, unknown_total, None, 5.0) == \
        "progress: lm_smollm2 (stage 3/4) 4 rows, 0.8 rows/s"


def test_reporter_prints_every_interval_and_once_at_the_end():
    counts = {"a": 0}

    def poll() -> dict[str, int]:
        counts["a"] += 1
        return dict(counts)

    out = io.StringIO()
    with ProgressReporter(["a"], 1000, poll, interval=0.05, stream=out):
        time.sleep(0.4)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert all(line.startswith("progress: a (stage 1/1) ") and line.endswith(tuple("0123456789s"))
               for line in lines)
    assert "/1000 rows" in lines[-1]


def _curate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"CURATE_PROGRESS_SECONDS": "0.5"}
    env.pop("CURATE_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_prints_progress_not_ray_logs_unless_verbose(small_corpus, tmp_path):
    out = tmp_path / "out"
    pipeline = tmp_path / "p.yaml"
    cfg = tiny_pipeline(str(small_corpus), str(out)) | {"ray": {"num_cpus": 2}}
    pipeline.write_text(yaml.safe_dump(cfg))

    quiet = _curate(tmp_path, "run", str(pipeline), "--date", "2026-03-01")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "progress: all 1 stages done, 6/6 rows in " in quiet.stderr
    for noise in RAY_FLOOD + ("Ray only requests", "Delete operation did not match"):
        assert noise not in quiet.stderr, quiet.stderr
    assert "committed" in quiet.stdout

    loud = _curate(tmp_path, "-v", "run", str(pipeline), "--date", "2026-03-02")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "progress: all 1 stages done" in loud.stderr
    assert "Execution plan of Dataset" in loud.stderr and "Started a local Ray instance" in loud.stderr


def test_board_sums_every_actors_rows_per_stage_and_clears_its_run_only(local_ray):
    """Each actor's unpickled copy of the board writes its own running total; the driver sums them."""
    board, other = ProgressBoard("run-a"), ProgressBoard("run-b")

    @local_ray.remote(num_cpus=0)
    class Stage:
        def __init__(self, board: ProgressBoard) -> None:
            self.board = board

        def batch(self, stage: str, rows: int) -> None:
            self.board.add(stage, rows)

    first, second = Stage.remote(board), Stage.remote(board)
    local_ray.get([first.batch.remote("lm", 128), first.batch.remote("lm", 72), second.batch.remote("lm", 64),
                   second.batch.remote("scores", 256)])
    other.add("lm", 5)
    assert board.snapshot() == {"lm": 264, "scores": 256}
    assert other.snapshot() == {"lm": 5}
    board.clear()
    assert board.snapshot() == {} and other.snapshot() == {"lm": 5}
    other.clear()
