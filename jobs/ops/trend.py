"""``curate report --trend``: one HTML page across nights, and the drift flags ``curate nightly`` logs.

Built from the ``runs`` table (the latest committed run of each date) and the committed tables,
through DuckDB over their snapshots' files (``jobs.ops.query.connect``), reading only the columns
each measure needs. Per night:

* rows in, out and quarantined; quarantine share = quarantined / in; wall seconds of the run;
* lm tokens/s per lm stage: Σ(``<model>__n_scored`` + 1) over the night's documents divided by that
  stage's compute seconds (``runs.stages``; summed over its actors, so it is per actor). Nights
  without those are shown as not recorded;
* selection share per operator: ``selected`` rows of that operator / ``documents`` rows;
* p5, p50 and p95 of every score column (``jobs.ops.report.score_columns``), DuckDB quantiles;
* token premium per language and tokenizer (``token_premium``).

Flags: a night whose quarantine share, or whose median (p50) of a score column, lies more than
``K`` = 3 MADs from the median of the trailing ``WINDOW`` = 14 nights (the nights before it;
MAD = median |x − median|, unscaled) is flagged. At least ``MIN_HISTORY`` earlier nights are needed
to judge one. When the trailing MAD is 0 any difference counts.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from matplotlib.figure import Figure

from jobs.errors import UserError
from jobs.ops.html import html_img, html_page, html_table
from jobs.ops.query import connect, is_local, output_of, sql_ident, views
from jobs.ops.report import score_columns
from pipelines.tables import Output

WINDOW = 14
K = 3.0
MIN_HISTORY = 4
TREND_NAME = "trend.html"
QUANTILES = (0.05, 0.5, 0.95)
LINE = "#4C72B0"
FLAG = "#C44E52"

log = logging.getLogger("curate.trend")


@dataclass
class Night:
    """The measures of one committed night."""

    run_date: str
    rows_in: int = 0
    rows_out: int = 0
    rows_quarantined: int = 0
    seconds: float = 0.0
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # lm stage -> tokens/s
    selection: dict[str, float] = field(default_factory=dict)  # operator -> share of documents
    scores: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # column -> p5, p50, p95
    premium: dict[tuple[str, str], float] = field(default_factory=dict)  # (tokenizer, lang) -> premium
    stage_seconds: dict[str, float] = field(default_factory=dict)  # from runs.stages

    @property
    def quarantine_share(self) -> float:
        return self.rows_quarantined / self.rows_in if self.rows_in else 0.0


@dataclass(frozen=True)
class Flag:
    """One measure of one night outside ``K`` MADs of its trailing nights."""

    run_date: str
    measure: str
    value: float
    median: float
    mad: float

    def __str__(self) -> str:
        return (f"night {self.run_date}: {self.measure} {self.value:.4g} is more than {K:g} MADs from "
                f"the trailing {WINDOW} nights' median {self.median:.4g} (MAD {self.mad:.4g})")


# ------------------------------------------------------------------------------------- measures


def collect_nights(output: str | Output, since: str | None = None, catalog: dict | None = None) -> list[Night]:
    """Every committed night from ``since`` on (all when None), oldest first (``catalog``: the
    output's catalog properties; default the embedded one)."""
    con = connect(output, catalog=catalog)
    try:
        tables = views(con)
        if "runs" not in tables:
            return []
        nights = _runs(con, since)
        if not nights:
            return []
        by_date = {n.run_date: n for n in nights}
        where = "WHERE run_date >= ?" if since else ""
        params = [since] if since else []
        if "documents" in tables:
            _documents(con, by_date, where, params)
        if "selected" in tables and "documents" in tables:
            _selection(con, by_date, where, params)
        if "token_premium" in tables:
            rows = con.execute(f"SELECT run_date, tokenizer, lang, premium FROM token_premium {where}",
                               params).fetchall()
            for d, tokenizer, lang, premium in rows:
                if d in by_date and premium is not None:
                    by_date[d].premium[(tokenizer, lang)] = float(premium)
    finally:
        con.close()
    return nights


def _runs(con: duckdb.DuckDBPyConnection, since: str | None) -> list[Night]:
    rows = con.execute(
        "SELECT run_date, rows_in, rows_out, rows_quarantined, seconds, stages FROM runs "
        "WHERE status = 'committed' AND (? IS NULL OR run_date >= ?) "
        "QUALIFY row_number() OVER (PARTITION BY run_date ORDER BY committed_at DESC) = 1 "
        "ORDER BY run_date", [since, since]).fetchall()
    nights = []
    for d, rin, rout, rq, secs, stages in rows:
        seconds = {s.get("name"): float(s.get("seconds") or 0.0) for s in json.loads(stages or "[]")}
        nights.append(Night(d, rin or 0, rout or 0, rq or 0, float(secs or 0.0), stage_seconds=seconds))
    return nights


def _documents(con: duckdb.DuckDBPyConnection, by_date: dict[str, Night], where: str, params: list) -> None:
    described = con.execute("DESCRIBE documents").fetchall()
    names = [r[0] for r in described]
    for column in score_columns(described):
        col = f"CAST({sql_ident(column)} AS DOUBLE)"
        rows = con.execute(f"SELECT run_date, quantile_cont({col}, {list(QUANTILES)}) FROM documents "
                           f"WHERE {col} IS NOT NULL AND isfinite({col}) {'AND run_date >= ?' if params else ''} "
                           "GROUP BY run_date", params).fetchall()
        for d, qs in rows:
            if d in by_date:
                by_date[d].scores[column] = tuple(float(q) for q in qs)
    for column in [n for n in names if n.endswith("__n_scored")]:
        model = column.removesuffix("__n_scored")
        rows = con.execute(f"SELECT run_date, sum({sql_ident(column)} + 1) FROM documents "
                           f"{where} GROUP BY run_date", params).fetchall()
        for d, tokens in rows:
            night = by_date.get(d)
            if night is None or not tokens:
                continue
            stage = f"lm_{model}"
            seconds = night.stage_seconds.get(stage)
            if seconds:
                night.tokens_per_s[stage] = float(tokens) / seconds


def _selection(con: duckdb.DuckDBPyConnection, by_date: dict[str, Night], where: str, params: list) -> None:
    docs = dict(con.execute(f"SELECT run_date, count(*) FROM documents {where} GROUP BY 1", params).fetchall())
    rows = con.execute(f"SELECT run_date, operator, count(*) FROM selected {where} GROUP BY 1, 2",
                       params).fetchall()
    for d, operator, n in rows:
        if d in by_date and docs.get(d):
            by_date[d].selection[operator] = n / docs[d]


# ----------------------------------------------------------------------------------------- flags


def outside(value: float, history: list[float], k: float = K) -> tuple[bool, float, float]:
    """Is ``value`` more than ``k`` MADs from the median of ``history``? (flag, median, MAD)."""
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    gap = abs(value - med)
    return gap > k * mad and gap > 1e-9 * max(1.0, abs(med)), med, mad


def drift_flags(nights: list[Night], window: int = WINDOW, k: float = K,
                min_history: int = MIN_HISTORY) -> list[Flag]:
    """Flags of every night (oldest first): quarantine share, and the median of each score column."""
    flags = []
    for i, night in enumerate(nights):
        trailing = nights[max(0, i - window):i]
        measures = {"quarantine share": (night.quarantine_share, [n.quarantine_share for n in trailing])}
        for column, (_, p50, _) in night.scores.items():
            history = [n.scores[column][1] for n in trailing if column in n.scores]
            measures[f"median {column}"] = (p50, history)
        for measure, (value, history) in measures.items():
            if len(history) < min_history:
                continue
            flagged, med, mad = outside(value, history, k)
            if flagged:
                flags.append(Flag(night.run_date, measure, value, med, mad))
    return flags


def check_drift(output: str | Output, dates: list[str], catalog: dict | None = None) -> list[Flag]:
    """The flags of ``dates`` (judged against all committed nights before each); each is logged."""
    nights = collect_nights(output, catalog=catalog)
    flags = [f for f in drift_flags(nights) if f.run_date in set(dates)]
    for flag in flags:
        log.warning("drift: %s", flag)
    return flags


# ------------------------------------------------------------------------------------------ page


def build_trend(output: str | Output, since: str | None = None) -> str:
    """The trend page's HTML (raises ``UserError`` when no night is committed)."""
    nights = collect_nights(output, since)
    if not nights:
        raise UserError(f"no committed night{' since ' + since if since else ''} under {output_of(output).url}")
    # flags are judged against the full history, also nights before --since
    shown = {n.run_date for n in nights}
    flags = [f for f in drift_flags(collect_nights(output) if since else nights) if f.run_date in shown]
    flagged: dict[str, list[Flag]] = {}
    for f in flags:
        flagged.setdefault(f.run_date, []).append(f)
    dates = [n.run_date for n in nights]
    sections = [_flags_section(flags), _nights_section(nights, flagged), _plots_section(nights, dates, flagged)]
    title = f"curate trend {dates[0]} to {dates[-1]}"
    return html_page(title, sections)


def _flags_section(flags: list[Flag]) -> str:
    rule = (f"<p>A night is flagged when its quarantine share, or the median of a score column, lies more "
            f"than {K:g} MADs from the median of the trailing {WINDOW} nights (at least {MIN_HISTORY}).</p>")
    if not flags:
        return "<h2>Flags</h2>" + rule + "<p>No night is flagged.</p>"
    items = "".join(f'<li class=flag>{html.escape(str(f))}</li>' for f in flags)
    return f"<h2>Flags</h2>{rule}<ul>{items}</ul>"


def _nights_section(nights: list[Night], flagged: dict[str, list[Flag]]) -> str:
    stages = sorted({s for n in nights for s in n.tokens_per_s})
    operators = sorted({o for n in nights for o in n.selection})
    head = ["night", "rows in", "rows out", "quarantined", "quarantine share", "wall s",
            *(f"{s} tokens/s" for s in stages), *(f"selected by {o}" for o in operators), "flags"]
    rows = []
    for n in nights:
        tps = [n.tokens_per_s.get(s) for s in stages]
        rows.append([n.run_date, n.rows_in, n.rows_out, n.rows_quarantined, n.quarantine_share, n.seconds,
                     *tps, *(n.selection.get(o) for o in operators),
                     "; ".join(f.measure for f in flagged.get(n.run_date, [])) or "-"])
    note = "" if stages else "<p>lm tokens/s: not recorded (no lm stage's token counts and seconds).</p>"
    out = "<h2>Nights</h2>" + html_table(head, rows) + note
    columns = sorted({c for n in nights for c in n.scores})
    if columns:
        score_rows = [[n.run_date, c, *n.scores[c]] for c in columns for n in nights if c in n.scores]
        out += "<h3>Scores</h3>" + html_table(["night", "column", "p5", "p50", "p95"], score_rows)
    pairs = sorted({p for n in nights for p in n.premium})
    if pairs:
        prem_rows = [[n.run_date, t, lang, n.premium[(t, lang)]] for t, lang in pairs for n in nights
                     if (t, lang) in n.premium]
        out += "<h3>Token premium</h3>" + html_table(["night", "tokenizer", "language", "premium"], prem_rows)
    return out


def _plots_section(nights: list[Night], dates: list[str], flagged: dict[str, list[Flag]]) -> str:
    def series(get) -> list[float | None]:  # noqa: ANN001
        return [get(n) for n in nights]

    def marks(measure: str) -> list[int]:
        return [i for i, d in enumerate(dates) if any(f.measure == measure for f in flagged.get(d, []))]

    plots = [_plot("rows", dates, {"in": series(lambda n: n.rows_in), "out": series(lambda n: n.rows_out),
                                   "quarantined": series(lambda n: n.rows_quarantined)}),
             _plot("quarantine share", dates, {"quarantine share": series(lambda n: n.quarantine_share)},
                   flagged=marks("quarantine share")),
             _plot("wall seconds", dates, {"seconds": series(lambda n: n.seconds)})]
    stages = sorted({s for n in nights for s in n.tokens_per_s})
    if stages:
        plots.append(_plot("lm tokens/s", dates, {s: series(lambda n, s=s: n.tokens_per_s.get(s)) for s in stages}))
    operators = sorted({o for n in nights for o in n.selection})
    if operators:
        plots.append(_plot("selection share", dates,
                           {o: series(lambda n, o=o: n.selection.get(o)) for o in operators}))
    for column in sorted({c for n in nights for c in n.scores}):
        q = [n.scores.get(column) for n in nights]
        plots.append(_plot(column, dates, {"p50": [v[1] if v else None for v in q]},
                           band=([v[0] if v else None for v in q], [v[2] if v else None for v in q]),
                           flagged=marks(f"median {column}")))
    for tokenizer in sorted({t for n in nights for t, _ in n.premium}):
        langs = sorted({lang for n in nights for t, lang in n.premium if t == tokenizer})
        plots.append(_plot(f"token premium ({tokenizer})", dates,
                           {lang: series(lambda n, key=(tokenizer, lang): n.premium.get(key)) for lang in langs}))
    return "<h2>Over time</h2>" + "".join(f"<h3>{html.escape(title)}</h3>{img}" for title, img in plots)


def _plot(title: str, dates: list[str], lines: dict[str, list[float | None]],
          band: tuple[list, list] | None = None, flagged: list[int] | None = None) -> tuple[str, str]:
    """One measure over the nights as a PNG (p5–p95 shaded when ``band``; flagged nights in red)."""
    fig = Figure(figsize=(7, 2.6), dpi=100)
    ax = fig.add_subplot()
    x = list(range(len(dates)))
    colours = [LINE, "#55A868", "#8172B2", "#CCB974", "#64B5CD", "#937860"]
    if band is not None:
        keep = [i for i in x if band[0][i] is not None]
        ax.fill_between(keep, [band[0][i] for i in keep], [band[1][i] for i in keep], color=LINE, alpha=0.2,
                        label="p5–p95")
    for j, (name, ys) in enumerate(lines.items()):
        keep = [i for i in x if ys[i] is not None]
        ax.plot(keep, [ys[i] for i in keep], marker="o", linewidth=2, color=colours[j % len(colours)], label=name)
    first = next(iter(lines.values()))
    for i in flagged or []:
        if first[i] is not None:
            ax.plot([i], [first[i]], marker="o", markersize=12, color=FLAG, linestyle="none")
    ax.set_xticks(x, dates, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=10)
    if len(lines) > 1 or band is not None:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return title, html_img(buf.getvalue(), f"{title} over time")


# -------------------------------------------------------------------------------------- writing


def trend_path(output: str | Output) -> str:
    root = output_of(output).root
    return f"{root.rstrip('/')}/reports/{TREND_NAME}"


def write_trend(output: str | Output, since: str | None = None) -> Path:
    """Build and write ``<output>/reports/trend.html``; its local path (remote outputs: a local copy)."""
    import tempfile

    page = build_trend(output, since)
    fs = output_of(output).fs
    target = trend_path(output)
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(target, "w", encoding="utf-8") as f:
        f.write(page)
    if is_local(fs):
        return Path(target)
    local = Path(tempfile.gettempdir()) / "curate-reports" / TREND_NAME
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(page, encoding="utf-8")
    return local


def trend_command(args: argparse.Namespace) -> int:
    """``curate report --trend``: build the page across nights and print its path."""
    from jobs.ops.target import output_from_args

    print(write_trend(output_from_args(args), args.since))
    return 0
