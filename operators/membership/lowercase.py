"""The ``lowercase_text`` stage: adds ``text_lower``, the input of the lowercase baseline's second LM pass (Carlini et al. 2021)."""

from __future__ import annotations

from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc

from operators.base import MiB, Resources, StageConfig


class LowercaseTextConfig(StageConfig):
    """Add ``column`` = lower(text), the input of the lowercase lm pass (Carlini et al. 2021)."""

    op: Literal["lowercase_text"] = "lowercase_text"
    column: str = "text_lower"
    resources: Resources = Resources(num_cpus=0.5, concurrency=1, batch_size=1024)
    default_memory: ClassVar[int] = 320 * MiB  # measured: 217 MiB peak USS (bench/stage_memory.py)

    def provides(self) -> list[str]:
        return [self.column]

    def build(self) -> LowercaseText:
        return LowercaseText(self.column)


class LowercaseText:
    """The operator: ``str.lower`` of every text."""

    def __init__(self, column: str) -> None:
        self.column = column

    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.column, pa.string())])

    def process(self, batch: pa.Table) -> pa.Table:
        return pa.table({self.column: pc.utf8_lower(batch.column("text"))}, schema=self.output_schema())
