"""The thin Ray shell around an operator: one instance per actor, called once per batch.

For each batch it
1. hands the operator only the rows nobody has quarantined yet;
2. if the operator raises, splits the batch in halves and retries, down to single rows, so one bad
   row (or a batch too big for memory) quarantines that row alone with the error as its reason;
3. puts the operator's columns back in row order (null for rows it did not process);
4. records its timing in ``__timing__<kind>__<stage>`` columns (folded by the writer, then dropped):
   ``seconds`` (its compute seconds, spread over the rows: summed), ``began`` / ``ended`` (wall-clock
   start and end of the batch: min / max over the run) and ``build`` (building the operator, on the
   actor's first batch: summed over actors);
5. tells the run's progress board (``pipelines.progress``), when it has one, how many rows it did.

Stages that share an actor (``resources.share``) run as a ``StageChain`` of runners, one per stage.
"""

from __future__ import annotations

import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from operators.base import Operator, StageConfig
from pipelines.progress import ProgressBoard

log = logging.getLogger("curate.stage")
TIMING_PREFIX = "__timing__"
#: How each timing column folds over the run's batches (an Arrow aggregate, and the same in Python).
TIMING_FOLDS = {"seconds": "sum", "build": "sum", "began": "min", "ended": "max"}
_PY_FOLDS = {"sum": sum, "min": min, "max": max}


class StageRunner:
    """Callable class for ``Dataset.map_batches``: builds the operator once, then runs batches."""

    def __init__(self, stage: StageConfig, progress: ProgressBoard | None = None, *, own_process: bool = True) -> None:
        start = time.perf_counter()
        if own_process:  # in a StageChain the chain sets the process's priority once
            lower_priority(stage.resources.nice)
        self.name = stage.stage_name
        self.operator: Operator = stage.build()
        self.schema = self.operator.output_schema()
        self.progress = progress  # a ProgressBoard, or None
        self.build_seconds: float | None = time.perf_counter() - start  # reported with the first batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        began, start = time.time(), time.perf_counter()
        live = pc.is_null(batch.column("quarantine_reason")).to_pylist()
        live_rows = [i for i, ok in enumerate(live) if ok]
        columns, failures = self._run(batch.take(live_rows)) if live_rows else (None, {})
        batch = self._attach(batch, live_rows, columns)
        batch = self._quarantine(batch, {live_rows[i]: why for i, why in failures.items()})
        return self._done(batch, began, start)

    def _done(self, batch: pa.Table, began: float, start: float) -> pa.Table:
        """``batch`` with its timing columns; tells the progress board."""
        n = batch.num_rows
        if self.progress is not None:
            try:
                self.progress.add(self.name, n)
            except Exception as err:  # noqa: BLE001 - progress must never fail a batch
                log.debug("progress not recorded: %s", err)
        seconds, build, self.build_seconds = time.perf_counter() - start, self.build_seconds or 0.0, None
        values = {"seconds": seconds / max(n, 1), "build": build / max(n, 1), "began": began,
                  "ended": began + seconds}
        for kind, value in values.items():
            batch = batch.append_column(timing_column(kind, self.name), pa.array([value] * n, pa.float64()))
        return batch

    def _run(self, rows: pa.Table) -> tuple[pa.Table, dict[int, str]]:
        """Operator output for ``rows``; failing rows get null columns and an error reason."""
        try:
            return self._checked(self.operator.process(rows), rows.num_rows), {}
        except Exception as err:  # noqa: BLE001 - isolate the failing rows, keep the rest
            if rows.num_rows == 1:
                log.warning("stage %s quarantined a row: %s", self.name, err)
                reason = f"{self.name} failed: {type(err).__name__}: {err}"[:2000]
                return _nulls(self.schema, 1), {0: reason}
            half = rows.num_rows // 2
            left, left_fail = self._run(rows.slice(0, half))
            right, right_fail = self._run(rows.slice(half))
            failures = {**left_fail, **{half + i: why for i, why in right_fail.items()}}
            return pa.concat_tables([left, right]), failures

    def _checked(self, out: pa.Table, n: int) -> pa.Table:
        if out.num_rows != n:
            raise RuntimeError(f"operator returned {out.num_rows} rows for {n}")
        return out.select(self.schema.names).cast(self.schema)

    def _attach(self, batch: pa.Table, live_rows: list[int], columns: pa.Table | None) -> pa.Table:
        if columns is None:
            columns = _nulls(self.schema, 0)
        position = {row: i for i, row in enumerate(live_rows)}
        index = pa.array([position.get(r) for r in range(batch.num_rows)], pa.int64())
        for field in self.schema:
            values = columns.column(field.name).take(index)
            if field.name in batch.column_names:
                batch = batch.set_column(batch.schema.get_field_index(field.name), field, values)
            else:
                batch = batch.append_column(field, values)
        return batch

    def _quarantine(self, batch: pa.Table, reasons: dict[int, str]) -> pa.Table:
        if not reasons:
            return batch
        reason = batch.column("quarantine_reason").to_pylist()
        stage = batch.column("quarantine_stage").to_pylist()
        for row, why in reasons.items():
            reason[row], stage[row] = why, self.name
        batch = batch.set_column(batch.schema.get_field_index("quarantine_reason"),
                                 "quarantine_reason", pa.array(reason, pa.string()))
        return batch.set_column(batch.schema.get_field_index("quarantine_stage"),
                                "quarantine_stage", pa.array(stage, pa.string()))


class StageChain:
    """Callable class for ``Dataset.map_batches``: consecutive stages sharing one actor
    (``resources.share``, ``pipelines.pools``). Builds a ``StageRunner`` per stage, in order, and
    passes every batch through them; each keeps its own quarantine, timing and progress, and a row
    one stage quarantines is not handed to the next."""

    def __init__(self, stages: list[StageConfig], progress: ProgressBoard | None = None) -> None:
        lower_priority(max(s.resources.nice for s in stages))
        self.runners = [StageRunner(stage, progress, own_process=False) for stage in stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for runner in self.runners:
            batch = runner(batch)
        return batch


def lower_priority(nice: int) -> None:
    """Add ``nice`` to this process's niceness (``resources.nice``; an actor process is the stage's own)."""
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as err:  # no such thing here: the stage runs at Ray's priority
            log.warning("could not lower this stage's priority by %d: %s", nice, err)


def timing_column(kind: str, stage: str) -> str:
    return f"{TIMING_PREFIX}{kind}__{stage}"


def fold_timing(batch: pa.Table) -> dict[str, dict[str, float]]:
    """Per stage, its timing folded over ``batch`` (see ``TIMING_FOLDS``)."""
    out: dict[str, dict[str, float]] = {}
    for column in batch.column_names:
        if column.startswith(TIMING_PREFIX) and batch.num_rows:
            kind, stage = column.removeprefix(TIMING_PREFIX).split("__", 1)
            values = batch.column(column)
            value = pc.call_function(TIMING_FOLDS[kind], [values]).as_py()
            out.setdefault(stage, {})[kind] = float(value or 0.0)
    return out


def merge_timing(into: dict[str, dict[str, float]], more: dict[str, dict[str, float]]) -> None:
    """Fold ``more`` into ``into`` (both per stage, per kind)."""
    for stage, kinds in more.items():
        mine = into.setdefault(stage, {})
        for kind, value in kinds.items():
            mine[kind] = _PY_FOLDS[TIMING_FOLDS[kind]]((mine[kind], value)) if kind in mine else value


def _nulls(schema: pa.Schema, n: int) -> pa.Table:
    return pa.table({f.name: pa.nulls(n, f.type) for f in schema}, schema=schema)
