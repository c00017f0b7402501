"""``curate report``: one self-contained HTML page per run date (charts inlined, no external assets).

Written to ``<output>/reports/run_date=D/report.html``. It shows the run (from the ``runs`` row of
the committed partition), counts and seconds per stage, rows per table, the token-premium chart
and table, and for every score column a histogram with its top and bottom documents.

Score columns: the floating-point columns of ``documents`` (scores, probabilities, ratios), except
ids and lineage; integer columns are ids or counts. Without any, the size columns (``n_chars``,
``n_bytes``, ``tokens__*``) are shown instead. ``score_columns=`` / ``--columns`` overrides the rule.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import re
import tempfile
from pathlib import Path

import duckdb
from matplotlib.figure import Figure

from jobs.errors import UserError
from jobs.ops.html import html_img, html_page, html_table
from jobs.ops.query import connect, is_local, output_of, partitions, sql_ident, views
from jobs.ops.summary import busy_window
from pipelines.tables import Output

REPORT_NAME = "report.html"
NOT_SCORES = {"id", "source_row", "source_file", "run_date"}
SIZE_COLUMNS = re.compile(r"^(n_chars|n_bytes|tokens__.+)$")
FLOAT_TYPES = {"DOUBLE", "FLOAT", "REAL"}
BINS = 30
EXAMPLES = 5
SNIPPET_CHARS = 200


def report_path(output: str | Output, run_date: str) -> str:
    """Where the report of ``run_date`` lives, inside the output's filesystem."""
    root = output_of(output).root
    return f"{root.rstrip('/')}/reports/run_date={run_date}/{REPORT_NAME}"


def write_report(output: str | Output, run_date: str, score_columns: list[str] | None = None) -> Path:
    """Build and write the report; returns its local path (for remote outputs: a local copy)."""
    page = build_report(output, run_date, score_columns)
    fs = output_of(output).fs
    target = report_path(output, run_date)
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(target, "w", encoding="utf-8") as f:
        f.write(page)
    if is_local(fs):
        return Path(target)
    local = Path(tempfile.gettempdir()) / "curate-reports" / f"run_date={run_date}" / REPORT_NAME
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(page, encoding="utf-8")
    return local


def build_report(output: str | Output, run_date: str, score_columns: list[str] | None = None) -> str:
    """The report's HTML for ``run_date`` (raises ``UserError`` when nothing is committed)."""
    parts = {t: p for t, p in partitions(output, run_date).items() if t != "runs"}
    if not parts:
        raise UserError(f"nothing is committed for {run_date} under {output_of(output).url}")
    con = connect(output, run_date)
    try:
        tables = views(con)
        docs_run_id = parts["documents"][0].manifest.get("run_id") if "documents" in parts else None
        sections = [
            _run_section(con, tables, docs_run_id),
            _tables_section(parts),
            _premium_section(con, tables, output, run_date),
            _quarantine_section(con, tables),
            _scores_section(con, tables, score_columns),
        ]
    finally:
        con.close()
    return html_page(f"curate report {run_date}", sections)


# ------------------------------------------------------------------------------------- sections


def _run_section(con: duckdb.DuckDBPyConnection, tables: list[str], run_id: str | None) -> str:
    if "runs" not in tables:
        return "<h2>Run</h2><p>No <code>runs</code> row for this date.</p>"
    rows = con.execute("SELECT * FROM runs ORDER BY (run_id = ?) DESC, (status = 'committed') DESC, "
                       "started_at DESC LIMIT 1", [run_id or ""]).fetchall()
    names = [d[0] for d in con.description]
    run = dict(zip(names, rows[0], strict=True))
    shown = {"pipeline": "pipeline", "run id": "run_id", "status": "status", "seconds": "seconds",
             "rows in": "rows_in", "rows out": "rows_out", "quarantined": "rows_quarantined",
             "config hash": "config_hash", "code version": "code_version", "error": "error"}
    facts = [(label, run.get(col)) for label, col in shown.items() if col != "error" or run.get(col)]
    stages = json.loads(run.get("stages") or "[]")
    stage_rows = [[s.get("name"), s.get("rows_in"), s.get("rows_out"), s.get("quarantined"),
                   f"{s.get('seconds') or 0:.2f}", f"{s.get('build_seconds') or 0:.1f}", busy_window(s.get("began_s"), s.get("ended_s"))]
                  for s in stages]
    return ("<h2>Run</h2>" + html_table(None, facts)
            + "<h3>Stages</h3>"
            + html_table(["stage", "rows in", "rows out", "quarantined", "seconds", "load s", "busy from-to s"],
                         stage_rows))



def _tables_section(parts: dict) -> str:
    rows = [[t, sum(p.rows for p in ps), sum(len(p.files) for p in ps)] for t, ps in parts.items()]
    return "<h2>Tables</h2>" + html_table(["table", "rows", "files"], rows)


def _premium_section(con: duckdb.DuckDBPyConnection, tables: list[str], output: str | Output,
                     run_date: str) -> str:
    fs, root = output_of(output).fs, output_of(output).root
    png = f"{root.rstrip('/')}/reports/run_date={run_date}/token_premium.png"
    chart = ""
    if fs.exists(png):
        with fs.open(png, "rb") as f:
            chart = html_img(f.read(), "token premium per language and tokenizer")
    if "token_premium" not in tables and not chart:
        return ""
    table = ""
    if "token_premium" in tables:
        rel = con.sql("SELECT * EXCLUDE (run_date) FROM token_premium "
                      "ORDER BY tokenizer, premium DESC NULLS LAST")
        table = html_table(rel.columns, rel.fetchall())
    return "<h2>Token premium</h2>" + chart + table


def _quarantine_section(con: duckdb.DuckDBPyConnection, tables: list[str]) -> str:
    if "quarantine" not in tables:
        return "<h2>Quarantine</h2><p>No quarantined rows.</p>"
    rows = con.execute("SELECT quarantine_stage, count(*) AS n FROM quarantine "
                       "GROUP BY 1 ORDER BY n DESC").fetchall()
    return "<h2>Quarantine</h2>" + html_table(["stage", "rows"], rows)


def _scores_section(con: duckdb.DuckDBPyConnection, tables: list[str],
                    chosen: list[str] | None) -> str:
    if "documents" not in tables:
        return "<h2>Scores</h2><p>No documents committed.</p>"
    described = con.execute("DESCRIBE documents").fetchall()
    columns = score_columns(described, chosen)
    has_text = any(r[0] == "text" for r in described)
    body = "".join(_score_block(con, c, has_text) for c in columns)
    sizes_only = not chosen and all(SIZE_COLUMNS.match(c) for c in columns)
    title = "Sizes (no score columns yet)" if columns and sizes_only else "Scores"
    return f"<h2>{title}</h2>" + (body or "<p>No numeric score columns.</p>")


def score_columns(described: list[tuple], chosen: list[str] | None = None) -> list[str]:
    """Which ``documents`` columns get a histogram (``described``: DESCRIBE rows: name, type, …)."""
    types = {row[0]: str(row[1]).upper() for row in described}
    if chosen:
        missing = [c for c in chosen if c not in types]
        if missing:
            raise UserError(f"score columns not in documents: {missing}; it has: {sorted(types)}")
        return list(chosen)
    scores = [n for n, t in types.items() if t in FLOAT_TYPES and n not in NOT_SCORES]
    return scores or [n for n in types if SIZE_COLUMNS.match(n)]


def _score_block(con: duckdb.DuckDBPyConnection, column: str, has_text: bool) -> str:
    col = f"CAST({sql_ident(column)} AS DOUBLE)"
    valid = f"{col} IS NOT NULL AND isfinite({col})"
    n, lo, hi, mean = con.execute(f"SELECT count(*), min({col}), max({col}), avg({col}) "
                                  f"FROM documents WHERE {valid}").fetchone()
    title = f"<h3>{html.escape(column)}</h3>"
    if not n:
        return title + "<p>No values.</p>"
    stats = f"<p>{n} values, min {lo:.4g}, mean {mean:.4g}, max {hi:.4g}</p>"
    return (title + stats + html_img(histogram_png(con, column, col, valid, lo, hi), f"{column} histogram")
            + _examples(con, column, col, valid, has_text))


def histogram_png(con: duckdb.DuckDBPyConnection, name: str, col: str, valid: str, lo: float,
                  hi: float) -> bytes:
    """A histogram computed in DuckDB (no rows pulled into Python), drawn as a PNG."""
    width = (hi - lo) / BINS or 1.0
    counts = dict(con.execute(f"SELECT least(floor(({col} - ?) / ?)::INTEGER, {BINS - 1}), count(*) "
                              f"FROM documents WHERE {valid} GROUP BY 1", [lo, width]).fetchall())
    edges = [lo + i * width for i in range(BINS)]
    fig = Figure(figsize=(6, 2.6), dpi=100)
    ax = fig.add_subplot()
    ax.bar(edges, [counts.get(i, 0) for i in range(BINS)], width=width, align="edge",
           color="#4C72B0", edgecolor="white")
    ax.set_xlabel(name)
    ax.set_ylabel("documents")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _examples(con: duckdb.DuckDBPyConnection, column: str, col: str, valid: str,
              has_text: bool) -> str:
    snippet = f"left(text, {SNIPPET_CHARS})" if has_text else "NULL"
    out = []
    for label, order in (("top", "DESC"), ("bottom", "ASC")):
        rows = con.execute(f"SELECT id, {col}, {snippet} FROM documents WHERE {valid} "
                           f"ORDER BY {col} {order}, id LIMIT {EXAMPLES}").fetchall()
        shown = [[i, f"{v:.4g}", t] for i, v, t in rows]
        out.append(f"<h4>{label} {len(rows)} by {html.escape(column)}</h4>"
                   + html_table(["id", column, f"text (first {SNIPPET_CHARS} chars)"], shown))
    return "".join(out)


# -------------------------------------------------------------------------------------- command


def latest_date(output: str | Output) -> str:
    """The newest run date with a committed partition."""
    dates = [p.run_date for t, parts in partitions(output).items() if t != "runs" for p in parts]
    if not dates:
        raise UserError(f"nothing is committed under {output_of(output).url}")
    return max(dates)


def report_command(args: argparse.Namespace) -> int:
    """``curate report``: print the report's path, building it if missing (or ``--rebuild``)."""
    from jobs.ops.target import output_from_args

    output = output_from_args(args)
    run_date = args.date or latest_date(output)
    fs = output.fs
    target = report_path(output, run_date)
    if args.rebuild or args.columns or not fs.exists(target) or not is_local(fs):
        print(write_report(output, run_date, args.columns))
    else:
        print(target)
    return 0
