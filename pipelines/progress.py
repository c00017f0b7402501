"""What a person sees while a run goes: per-stage progress, and Ray's own logs kept out of the way.

* On a terminal (``sys.stderr.isatty()``) Ray Data draws its progress bars (rows done of total per
  operator, rate, time left).
* Elsewhere (cron, CI, a log file) one line every ``CURATE_PROGRESS_SECONDS`` (default 5) on stderr
  names the earliest stage with rows still to do (the one the run waits on)::

      progress: lm_smollm2 320/840 rows, 4.1 rows/s, ETA 2m07s

  Each ``StageRunner`` adds its batch's rows to a ``ProgressBoard`` in Ray's GCS key-value store;
  the driver polls it. The total is the input shards' row count from their Parquet footers.
* Ray's log flood (Ray Data's operator log and progress log, "uses X MiB … Ray only requests"
  warnings, worker output) is hidden unless ``curate -v`` (``CURATE_VERBOSE=1``): Ray Data's console
  handler is raised to ERROR (its ``ray-data.log`` file in the session directory keeps everything),
  ``ray.init`` gets ``logging_level=ERROR`` (the "ray" logger) and ``log_to_driver=False``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TextIO

VERBOSE_ENV = "CURATE_VERBOSE"
INTERVAL_ENV = "CURATE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 5.0
KV_NAMESPACE = "curate_progress"

log = logging.getLogger("curate.progress")


def verbose() -> bool:
    """True when the user asked for Ray's own logs (``curate -v`` sets ``CURATE_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_init_options() -> dict:
    """Keyword arguments for ``ray.init`` of an embedded or connected Ray: quiet unless verbose."""
    if verbose():
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def quiet_ray_data(use_bars: bool | None = None) -> None:
    """Configure Ray Data's driver output for this process (call before building a dataset).

    Not verbose: Ray Data's console handlers only pass errors (the session's ``ray-data.log`` still
    gets everything) and the high-memory warning is off. Progress bars only on a terminal.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if use_bars is None:
        use_bars = sys.stderr.isatty()
    if not use_bars:
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        ours = type(handler).__module__.startswith("ray.")  # never another library's (pytest's, the app's)
        if ours and not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1


# ------------------------------------------------------------------------------------- counting


class ProgressBoard:
    """Rows each stage has finished, in Ray's GCS key-value store (namespace ``curate_progress``).

    Every copy of the board in a stage actor keeps its own running totals and writes them, once per
    batch, under ``<run>/<stage>/<copy>``; the driver sums a stage's keys. No actor of its own: one
    more process on the node wakes ~150 times a second and slows the lm stage's OpenMP threads
    (docs/internals.md, "Where the lm stage's time goes").
    """

    def __init__(self, run_id: str) -> None:
        self.prefix = f"{run_id}/"
        self._copy = ""  # set in the process that first adds: each actor's unpickled copy its own
        self._rows: dict[str, int] = {}

    def add(self, stage: str, rows: int) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        self._copy = self._copy or uuid.uuid4().hex
        self._rows[stage] = self._rows.get(stage, 0) + rows
        _internal_kv_put(f"{self.prefix}{stage}/{self._copy}", str(self._rows[stage]), namespace=KV_NAMESPACE)

    def snapshot(self) -> dict[str, int]:
        """Rows per stage, over every actor that reported."""
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

        done: dict[str, int] = {}
        for key in _internal_kv_list(self.prefix, namespace=KV_NAMESPACE):
            stage = key.decode().removeprefix(self.prefix).rsplit("/", 1)[0]
            value = _internal_kv_get(key, namespace=KV_NAMESPACE)
            done[stage] = done.get(stage, 0) + int(value or 0)
        return done

    def clear(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(self.prefix, del_by_prefix=True, namespace=KV_NAMESPACE)


def format_duration(seconds: float) -> str:
    """``7s``, ``2m07s``, ``1h04m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(stages: list[str], done: dict[str, int], total: int | None, elapsed: float) -> str | None:
    """One line for the earliest stage with rows still to do (its input's rows, or the total, not yet
    done): the stage the run waits on. A later stage's backlog is not work it could be doing yet, as
    rows reach it in whole blocks of the stage before. None before any rows.

    rows/s is that stage's rows over the time since execution started; the ETA is its rows left at
    that rate. ``total`` None (unknown): rows without total or ETA.
    """
    if not any(done.get(s) for s in stages):
        return None
    upstream, pick = total, stages[-1]
    for stage in stages:
        mine = done.get(stage, 0)
        if upstream is not None and mine < upstream:
            pick = stage
            break
        upstream = mine
    rows = done.get(pick, 0)
    rate = rows / elapsed if elapsed > 0 else 0.0
    index = stages.index(pick) + 1
    if total is None:
        return f"progress: {pick} (stage {index}/{len(stages)}) {rows} rows, {rate:.1f} rows/s"
    total = max(total, rows)
    eta = format_duration((total - rows) / rate) if rate > 0 else "?"
    if rows >= total and all(done.get(s, 0) >= total for s in stages):
        return f"progress: all {len(stages)} stages done, {total}/{total} rows in {format_duration(elapsed)}"
    return (f"progress: {pick} (stage {index}/{len(stages)}) {rows}/{total} rows, "
            f"{rate:.1f} rows/s, ETA {eta}")


class ProgressReporter:
    """A driver thread printing ``progress_line`` every ``interval`` seconds (and once at the end)."""

    def __init__(self, stages: list[str], total: int | None, poll: Callable[[], dict[str, int]],
                 interval: float | None = None, stream: TextIO | None = None) -> None:
        self.stages, self.total, self.poll = stages, total, poll
        self.interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)) if interval is None else interval
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="curate-progress", daemon=True)
        self._last: str | None = None
        self._started = 0.0

    def __enter__(self) -> ProgressReporter:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if exc[0] is None:
            self.report()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        try:
            done = self.poll()
        except Exception as err:  # noqa: BLE001 - progress must never break a run
            log.debug("progress poll failed: %s", err)
            return
        line = progress_line(self.stages, done, self.total, time.perf_counter() - self._started)
        if line is not None and line != self._last:
            print(line, file=self.stream, flush=True)
            self._last = line
