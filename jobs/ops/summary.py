"""The summary a finished run prints: per-stage counts and times, the tables written, a query to try."""

from __future__ import annotations

from pipelines.runner import RunResult

REPORTS_TABLE = "reports"


def busy_window(began_s: float | None, ended_s: float | None) -> str:
    """When a stage's first batch began and its last ended, in seconds after the run started."""
    return f"{began_s:.0f}-{ended_s:.0f}" if began_s is not None and ended_s is not None else ""


def format_summary(result: RunResult) -> str:
    """Human summary: per-stage counts and times, tables, and a query to try."""
    lines = [f"\nrun {result.run_id} for {result.run_date}: {result.status} in {result.seconds:.1f}s",
             f"{'stage':<24}{'in':>9}{'out':>9}{'quarantined':>13}{'seconds':>10}{'load s':>8}  busy from-to s"]
    for s in result.stages:
        lines.append(f"{s.name:<24}{s.rows_in:>9}{s.rows_out:>9}{s.quarantined:>13}{s.seconds:>10.2f}"
                     f"{s.build_seconds:>8.1f}  {busy_window(s.began_s, s.ended_s)}".rstrip())
    lines.append(f"rows in {result.rows_in} = out {result.rows_out} + quarantined "
                 f"{result.rows_quarantined}")
    lines.append(f"Iceberg tables in the catalog under {result.output_url} (run_date = {result.run_date}):")
    for table, rows in sorted(result.tables.items()):
        if table == REPORTS_TABLE:  # files (chart, report page), not rows: printed as `report:`
            continue
        lines.append(f"  {table:<16}{rows:>9} rows")
    lines.append('try: curate query "SELECT tokenizer, lang, premium FROM token_premium '
                 'ORDER BY tokenizer, premium DESC LIMIT 10"')
    return "\n".join(lines)
