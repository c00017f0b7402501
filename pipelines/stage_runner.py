"""The thin Ray shell around an operator: one instance per actor, called once per batch.

For each batch it
1. hands the operator only the rows nobody has quarantined yet;
2. if the operator raises, splits the batch in halves and retries, down to single rows, so one bad
   row (or a batch too big for memory) quarantines that row alone with the error as its reason;
3. puts the operator's columns back in row order (null for rows it did not process);
4. records its compute seconds in a ``__seconds__<stage>`` column (summed later, then dropped);
5. tells the run's progress counter (``pipelines.progress``), when it has one, how many rows it did.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from operators.base import Operator, StageConfig

log = logging.getLogger("curate.stage")
SECONDS_PREFIX = "__seconds__"


class StageRunner:
    """Callable class for ``Dataset.map_batches``: builds the operator once, then runs batches."""

    def __init__(self, stage: StageConfig, progress: object | None = None) -> None:
        self.name = stage.stage_name
        self.operator: Operator = stage.build()
        self.schema = self.operator.output_schema()
        self.progress = progress  # a ProgressCounter actor handle (fire and forget), or None

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        live = pc.is_null(batch.column("quarantine_reason")).to_pylist()
        live_rows = [i for i, ok in enumerate(live) if ok]
        columns, failures = self._run(batch.take(live_rows)) if live_rows else (None, {})
        batch = self._attach(batch, live_rows, columns)
        batch = self._quarantine(batch, {live_rows[i]: why for i, why in failures.items()})
        seconds = time.perf_counter() - start
        per_row = pa.array([seconds / max(batch.num_rows, 1)] * batch.num_rows, pa.float64())
        if self.progress is not None:
            self.progress.add.remote(self.name, batch.num_rows)
        return batch.append_column(f"{SECONDS_PREFIX}{self.name}", per_row)

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


def _nulls(schema: pa.Schema, n: int) -> pa.Table:
    return pa.table({f.name: pa.nulls(n, f.type) for f in schema}, schema=schema)
