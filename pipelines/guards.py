"""Guards a night passes before its commit: a rerun may not wipe or shrink a committed night by accident.

For the date being run, with ``committed`` the ``documents`` rows its latest committed run recorded
(the ``tables`` column of ``runs``) and ``new`` the rows this run would commit::

    refused  when  rows read = 0                                  (an empty input is no night)
    refused  when  committed > 0  and  new = 0
    refused  when  committed > 0  and  (committed - new) / committed > output.max_shrink_share

The default share is 0.5: 40 committed rows may become 20, not 19. A refused run fails before its
commit (``RunFailed``: recorded as failed in ``runs``, its staged files removed), naming both counts.
``--allow-shrink`` (``run``, ``nightly``, ``quarantine replay``) lets it through.
"""

from __future__ import annotations

import json

from operators.base import RunFailed

#: The table whose rows measure a night.
MEASURED = "documents"
ALLOW_FLAG = "--allow-shrink"


class ShrinkRefused(RunFailed):
    """A rerun would wipe or shrink a committed night beyond ``output.max_shrink_share``."""


def committed_rows(catalog, run_date: str, table: str = MEASURED) -> int:  # noqa: ANN001 - a pyiceberg Catalog
    """Rows of ``table`` the latest committed run of ``run_date`` recorded (0 when none committed)."""
    from pipelines.tables import committed_runs

    row = committed_runs(catalog).get(run_date)
    if row is None:
        return 0
    return int(json.loads(row["tables"] or "{}").get(table, 0) or 0)


def shrink_error(run_date: str, committed: int, new: int, rows_read: int, max_share: float) -> str | None:
    """Why committing ``new`` rows over ``committed`` ones is refused, or None (see the module docstring)."""
    if rows_read == 0:
        return (f"the input of {run_date} holds 0 rows: nothing to commit"
                + (f" (the committed night has {committed} {MEASURED} rows)" if committed else "")
                + f"; pass {ALLOW_FLAG} to commit an empty night")
    if committed <= 0:
        return None
    shrink = (committed - new) / committed
    if new == 0 or shrink > max_share:
        return (f"refusing to replace {run_date}: {MEASURED} would shrink from {committed} committed rows to "
                f"{new} ({shrink:.0%} fewer, over output.max_shrink_share {max_share:g}); the committed night "
                f"is kept; pass {ALLOW_FLAG} to replace it anyway")
    return None


def check_shrink(catalog, run_date: str, new: int, rows_read: int, max_share: float,  # noqa: ANN001
                 allow: bool = False) -> None:
    """Raise ``ShrinkRefused`` when this run must not replace the committed night (unless ``allow``)."""
    if allow:
        return
    error = shrink_error(run_date, committed_rows(catalog, run_date), new, rows_read, max_share)
    if error:
        raise ShrinkRefused(error)
