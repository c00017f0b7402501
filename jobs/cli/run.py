"""``curate run PIPELINE``: run a pipeline once for a date and print its summary."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, date, datetime

from jobs.cli.verbs import verb
from jobs.errors import UserError
from jobs.ops.summary import format_summary
from pipelines.config import ConfigError, load_config
from pipelines.io import InputError
from pipelines.lock import LockHeld, LockLost
from pipelines.runner import RunFailed, run_pipeline
from pipelines.tables import CatalogError, output_of_config


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "run", "run a pipeline on Ray and commit its tables for one date",
             "curate run pipelines/nightly.yaml --output ./output --date 2026-01-31")
    p.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/nightly.yaml")
    p.add_argument("--date", type=parse_date, default=today(), help="run date (default: today, UTC)")
    p.add_argument("--input", help="override input.url")
    p.add_argument("--output", help="override output.url")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else embedded Ray)")
    add_allow_shrink(p)
    p.set_defaults(func=run_command)


def add_allow_shrink(p: argparse.ArgumentParser) -> None:
    """``--allow-shrink``: let a rerun wipe or shrink a committed night (``pipelines.guards``)."""
    p.add_argument("--allow-shrink", dest="allow_shrink", action="store_true",
                   help="replace a committed night even with 0 documents or over output.max_shrink_share "
                        "fewer (default 0.5; refused without this flag)")


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def parse_date(value: str) -> str:
    """``YYYY-MM-DD`` only (``date.fromisoformat`` also takes ``20260101`` and ``2026-W01-1``)."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError(value)
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def run_command(args: argparse.Namespace) -> int:
    overrides = {"input": {"url": args.input}, "output": {"url": args.output},
                 "ray": {"address": args.address}}
    cfg = None
    try:
        cfg = load_config(args.pipeline, overrides)
        result = run_pipeline(cfg, args.date, allow_shrink=getattr(args, "allow_shrink", False))
    except (ConfigError, InputError, LockHeld, CatalogError) as err:
        raise UserError(str(err)) from None
    except LockLost as err:  # another run took the date over: recorded as failed, nothing committed
        print(f"curate: error: run failed, nothing committed: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a full disk mid-commit: the runs row was not written, nothing committed
        raise UserError(storage_error(err, cfg.output.url if cfg else args.pipeline)) from None
    except RunFailed as err:  # recorded as failed in `runs`, nothing committed: no traceback, exit 1
        if getattr(err, "result", None) is not None:
            print(format_summary(err.result))  # type: ignore[attr-defined]
        print(f"curate: error: run failed, nothing committed: {err}", file=sys.stderr)
        return 1
    print(format_summary(result))
    if not result.tables.get("documents"):  # an empty night, committed with --allow-shrink: no report
        print(f"report: none ({result.run_date} has no documents)")
        return 0
    from jobs.ops.report import write_report

    print(f"report: {write_report(output_of_config(cfg), result.run_date)}")
    return 0


def storage_error(err: OSError, output_url: str) -> str:
    """One line for a storage failure of a run (the night is not committed: its runs row is the commit)."""
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return (f"storage error under {output_url}: {err.strerror or err}{where}; this run committed nothing "
            "and the committed nights are intact; fix the storage and run again")
