"""``curate run PIPELINE``: run a pipeline once for a date and print its summary."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime

from jobs.cli import UserError
from pipelines.config import ConfigError, load_config
from pipelines.io import InputError
from pipelines.runner import RunFailed, RunResult, run_pipeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a pipeline on Ray and commit its tables")
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
    except (ConfigError, InputError) as err:
        raise UserError(str(err)) from None
    except RunFailed as err:  # recorded as failed in `runs`, nothing committed: no traceback, exit 1
        if getattr(err, "result", None) is not None:
            print(format_summary(err.result))  # type: ignore[attr-defined]
        print(f"curate: error: run failed, nothing committed: {err}", file=sys.stderr)
        return 1
    print(format_summary(result))
    from jobs.report import write_report  # lazy: matplotlib is slow to import

    print(f"report: {write_report(result.output_url, result.run_date)}")
    return 0


REPORTS_TABLE = "reports"


def format_summary(result: RunResult) -> str:
    """Human summary: per-stage counts and times, tables, and a query to try."""
    lines = [f"\nrun {result.run_id} for {result.run_date}: {result.status} in {result.seconds:.1f}s",
             f"{'stage':<24}{'in':>9}{'out':>9}{'quarantined':>13}{'seconds':>10}"]
    for s in result.stages:
        lines.append(f"{s.name:<24}{s.rows_in:>9}{s.rows_out:>9}{s.quarantined:>13}{s.seconds:>10.2f}")
    lines.append(f"rows in {result.rows_in} = out {result.rows_out} + quarantined "
                 f"{result.rows_quarantined}")
    lines.append(f"tables under {result.output_url}:")
    for table, rows in sorted(result.tables.items()):
        if table == REPORTS_TABLE:  # files (chart, report page), not rows: printed as `report:`
            continue
        lines.append(f"  {table:<16}{rows:>9} rows   {result.output_url}/{table}/run_date={result.run_date}/")
    lines.append('try: curate query "SELECT tokenizer, lang, premium FROM token_premium '
                 'ORDER BY tokenizer, premium DESC LIMIT 10"')
    return "\n".join(lines)
