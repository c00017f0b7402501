"""``curate run PIPELINE``: run a pipeline once for a date and print its summary."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime

from jobs.cli.verbs import verb
from jobs.errors import UserError
from jobs.ops.summary import format_summary
from pipelines.config import ConfigError, load_config
from pipelines.io import InputError
from pipelines.lock import LockHeld, LockLost
from pipelines.runner import RunFailed, run_pipeline
from pipelines.tables import CatalogError


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "run", "run a pipeline on Ray and commit its tables for one date",
             "curate run pipelines/nightly.yaml --output ./output --date 2026-01-31")
    p.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/nightly.yaml")
    p.add_argument("--date", type=parse_date, default=today(), help="run date (default: today, UTC)")
    p.add_argument("--input", help="override input.url")
    p.add_argument("--output", help="override output.url")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else embedded Ray)")
    p.set_defaults(func=run_command)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def parse_date(value: str) -> str:
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def run_command(args: argparse.Namespace) -> int:
    overrides = {"input": {"url": args.input}, "output": {"url": args.output},
                 "ray": {"address": args.address}}
    try:
        cfg = load_config(args.pipeline, overrides)
        result = run_pipeline(cfg, args.date)
    except (ConfigError, InputError, LockHeld, CatalogError) as err:
        raise UserError(str(err)) from None
    except LockLost as err:  # another run took the date over: recorded as failed, nothing committed
        print(f"curate: error: run failed, nothing committed: {err}", file=sys.stderr)
        return 1
    except RunFailed as err:  # recorded as failed in `runs`, nothing committed: no traceback, exit 1
        if getattr(err, "result", None) is not None:
            print(format_summary(err.result))  # type: ignore[attr-defined]
        print(f"curate: error: run failed, nothing committed: {err}", file=sys.stderr)
        return 1
    print(format_summary(result))
    from jobs.ops.report import write_report

    print(f"report: {write_report(result.output_url, result.run_date)}")
    return 0
