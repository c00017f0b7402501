"""The whole-plan check: every column a stage reads is made by an earlier stage.

Each stage declares, from its config, the columns it ``requires`` (``operators.base.Need``: the
columns, the config field that asks for them, its value) and the columns it ``provides``; stages
that name another stage resolve it in ``bind``. Walking the stages in order, the check keeps the
columns made so far and fails on the first reference nothing satisfies, naming the field path,
the bad value and the valid choices:

    p.yaml: stages.3.scores.model: 'smolm2': no earlier stage makes column 'smolm2__logprob'
    (needs an earlier lm stage with model.name 'smolm2' ...); valid choices: ['smollm2']

It runs when a config is loaded (``pipelines.config.parse_config``), before Ray starts.
"""

from __future__ import annotations

from collections.abc import Iterable

from operators.base import BASE_COLUMNS, Need, PlanError, StageConfig


def stage_path(index: int, stage: StageConfig, field: str) -> str:
    """The field path as config errors spell it: ``stages.<i>.<op>.<field>``."""
    return f"stages.{index}.{stage.op}.{field}"


def _choices(need: Need, available: set[str]) -> str:
    """What would satisfy ``need``: model prefixes that have the column, or plain columns."""
    if all("__" in c for c in need.columns):
        suffixes = {c.split("__", 1)[1] for c in need.columns}
        prefixes = sorted(
            {c.split("__", 1)[0] for c in available if "__" in c and c.split("__", 1)[1] in suffixes}
        )
        return f"valid choices: {prefixes}" if need.prefix else f"earlier stages make it for: {prefixes}"
    lineage = {"id", "source_file", "source_row"}
    return f"valid choices: {sorted(c for c in available if '__' not in c and c not in lineage)}"


def plan_errors(stages: list[StageConfig], input_columns: Iterable[str] = ()) -> tuple[list[StageConfig], list[str]]:
    """(the bound stages, one message per unsatisfied reference)."""
    available = set(BASE_COLUMNS) | set(input_columns)
    bound: list[StageConfig] = []
    errors: list[str] = []
    for i, stage in enumerate(stages):
        try:
            stage = stage.bind(list(bound))
        except PlanError as err:
            errors.append(
                f"{stage_path(i, stage, err.field)}: {err.value!r} {err}; valid choices: {err.choices or []}"
            )
        else:
            for need in stage.requires():
                if not any(c in available for c in need.columns):
                    wanted = " or ".join(repr(c) for c in need.columns)
                    errors.append(
                        f"{stage_path(i, stage, need.field)}: {need.value!r}: no earlier stage "
                        f"makes column {wanted}"
                        + (f" (needs {need.hint})" if need.hint else "")
                        + f"; {_choices(need, available)}"
                    )
                    break  # one message per stage: the first missing column names the cause
        bound.append(stage)
        available |= set(stage.provides())
    return bound, errors
