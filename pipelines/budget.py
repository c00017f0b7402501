"""The error budget: a night that quarantines too much fails instead of committing.

    run    quarantined rows / rows read          > max_quarantine_share          (default 0.5)
    stage  rows it quarantined / rows it got     > stages[i].max_quarantine_share (default: none)
    files  input files that cannot be read at all > max_unreadable_files          (default 0)

Rows of a corrupt row group count as the rows its metadata declares (``pipelines.lost``); a file
without a readable footer declares nothing, so it counts against ``max_unreadable_files``.

Checked after the streaming pass, before finalize and commit. A typo that makes a stage fail on
every row (share 1.0) stops the night; a few bad rows (the usual empty texts) pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from operators.base import RunFailed
from pipelines.config import PipelineConfig


class _Counts(Protocol):
    name: str
    rows_in: int
    quarantined: int


def share(quarantined: int, rows: int) -> float:
    """quarantined / rows (0 for no rows)."""
    return quarantined / rows if rows else 0.0


def budget_errors(cfg: PipelineConfig, stages: list[_Counts], unreadable_files: list[str] = ()) -> list[str]:
    """One message per budget passed; ``stages`` are the run's per-stage counts, ``read`` first;
    ``unreadable_files`` the input files that could not be read at all."""
    errors = []
    if len(unreadable_files) > cfg.max_unreadable_files:
        shown = ", ".join(unreadable_files[:5]) + (f" and {len(unreadable_files) - 5} more"
                                                   if len(unreadable_files) > 5 else "")
        errors.append(f"{len(unreadable_files)} input file(s) could not be read at all (their rows cannot be "
                      f"counted), over max_unreadable_files {cfg.max_unreadable_files}: {shown}")
    by_name = {s.name: s for s in stages}
    for stage in cfg.stages:
        counts, limit = by_name.get(stage.stage_name), stage.max_quarantine_share
        if limit is None or counts is None:
            continue
        got = share(counts.quarantined, counts.rows_in)
        if got > limit:
            errors.append(
                f"stage {stage.stage_name} quarantined {counts.quarantined} of its {counts.rows_in} "
                f"rows ({got:.0%}), over its max_quarantine_share {limit:g}"
            )
    rows = stages[0].rows_in if stages else 0
    quarantined = sum(s.quarantined for s in stages)
    got = share(quarantined, rows)
    if got > cfg.max_quarantine_share:
        worst = max(stages, key=lambda s: s.quarantined)
        errors.append(
            f"the run quarantined {quarantined} of {rows} rows ({got:.0%}), over "
            f"max_quarantine_share {cfg.max_quarantine_share:g}; most by stage {worst.name} "
            f"({worst.quarantined})"
        )
    return errors


def check_budget(cfg: PipelineConfig, stages: list[_Counts], reasons: Callable[[], list[str]],
                 unreadable_files: list[str] = ()) -> None:
    """Raise ``RunFailed`` when the run or a stage passed its error budget, quoting ``reasons()``
    (a few distinct quarantine reasons: the quarantine table of a failed run is not committed)."""
    errors = budget_errors(cfg, stages, unreadable_files)
    if errors:
        examples = "".join(f"\n  e.g. {r}" for r in reasons())
        raise RunFailed("error budget passed: " + "; ".join(errors) + examples)
