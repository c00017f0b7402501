"""``curate maintain``: expire old snapshots and remove orphan files older than the grace period
(``pipelines.maintain``)."""

from __future__ import annotations

import argparse

from jobs.errors import UserError
from jobs.ops.target import output_from_args
from pipelines.maintain import maintain
from pipelines.tables import CatalogError


def maintain_command(args: argparse.Namespace) -> int:
    """Run the upkeep of the output and print what it removed."""
    output = output_from_args(args)
    try:
        report = maintain(output, args.retain_days, args.dry_run, grace_hours=args.grace_hours,
                          cache_days=getattr(args, "cache_days", None))
    except CatalogError as err:
        raise UserError(f"{output.url}: {err}" if output.url not in str(err) else str(err)) from None
    print(report.summary())
    return 0
