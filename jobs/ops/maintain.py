"""``curate maintain``: expire old snapshots and remove orphan files older than the grace period
(``pipelines.maintain``)."""

from __future__ import annotations

import argparse

from jobs.errors import UserError
from pipelines.config import ConfigError, load_config
from pipelines.maintain import maintain
from pipelines.tables import CatalogError, Output, open_output


def output_of(args: argparse.Namespace) -> Output:
    """``--output`` (embedded catalog), or the output (url and catalog) of ``--pipeline``."""
    if not getattr(args, "pipeline", None):
        return open_output(args.output or getattr(args, "default_output", "./output"))
    try:
        cfg = load_config(args.pipeline)
    except ConfigError as err:
        raise UserError(str(err)) from None
    return open_output(args.output or cfg.output.url, cfg.output.catalog)


def maintain_command(args: argparse.Namespace) -> int:
    """Run the upkeep of the output and print what it removed."""
    output = output_of(args)
    try:
        report = maintain(output, args.retain_days, args.dry_run, grace_hours=args.grace_hours)
    except CatalogError as err:
        raise UserError(f"{output.url}: {err}" if output.url not in str(err) else str(err)) from None
    print(report.summary())
    return 0
