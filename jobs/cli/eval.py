"""``curate eval``: how well do score columns separate labelled documents?

    curate eval --input output/documents/run_date=2025-01-01 --scores smollm2__dcpdd,smollm2__mink
    curate eval --input labeled.parquet --output eval/      # every float column, eval.json + roc.png

The input (a Parquet file or directory, any fsspec URL) needs ``label`` (1 = member of the training
data or machine-written, 0 = not) and the score columns. See ``jobs/eval/roc.py`` for the metrics.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from jobs.cli.verbs import add_table_source, table_source, verb
from jobs.errors import UserError
from pipelines.io import InputError, url_to_fs
from pipelines.tables import read_table


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "eval", "AUROC, TPR@5%FPR, balanced accuracy of scores vs a label",
             "curate eval --input labelled.parquet --output eval/")
    p.add_argument("--input", required=True, help="labelled Parquet file or directory (fsspec URL), or a "
                   "committed table <output>/<table>[/run_date=D]")
    add_table_source(p)
    p.add_argument("--scores", help="comma-separated score columns (default: every float column)")
    p.add_argument("--label", default="label", help="label column (default: label)")
    p.add_argument("--fpr", type=float, default=0.05, help="report the TPR at this FPR (default 0.05)")
    p.add_argument("--output", help="directory for eval.json and roc.png (default: print only)")
    p.add_argument("--direction", action="append", default=[], metavar="COLUMN=higher|lower",
                   help="direction of a score without a registered one (repeatable); registered: "
                        "each score's definition (operators/scores.py SCORE_DIRECTIONS)")
    p.add_argument("--best-direction", action="store_true",
                   help="EXPLORATORY: pick each score's direction after seeing the labels (AUROC ≥ 0.5)")
    p.set_defaults(func=eval_command)


def run_eval(input_url: str, scores: list[str] | None = None, output: str | None = None,
             label: str = "label", max_fpr: float = 0.05, directions: dict[str, str] | None = None,
             best: bool = False, tables: dict | None = None) -> list:
    """Evaluate, print the table, and write ``eval.json`` + ``roc.png`` under ``output``.

    Each score is reported in its own direction (registered or ``directions``), fixed before the
    labels are seen; ``best`` is the exploratory alternative. ``tables``: ``catalog`` and ``storage``
    of an ``<output>/<table>`` input on a shared catalog."""
    from jobs.eval.roc import evaluate_table, format_results, plot_roc, score_columns

    table = read_table(input_url, [label, *scores] if scores else None, **(tables or {}))
    try:
        results, curves = evaluate_table(table, scores, label, max_fpr, directions, best)
    except ValueError as err:
        raise UserError(f"{input_url}: {err}") from None
    print(format_results(results))
    if not scores and not best:
        skipped = sorted(set(score_columns(table.schema, label, best=True)) - {r.score for r in results})
        if skipped:
            print(f"not evaluated (no registered direction; use --direction COLUMN=higher|lower): {skipped}")
    if output:
        fs, root = url_to_fs(output)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/eval.json", "w") as f:
            json.dump({"input": input_url, "label": label, "n_rows": table.num_rows,
                       "direction": "best (exploratory)" if best else "registered / given",
                       "scores": [r.as_dict() for r in results]}, f, indent=2)
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_roc(curves, results, Path(tmp) / "roc.png", title=f"ROC: {label}")
            fs.put_file(str(png), f"{root}/roc.png")
        print(f"wrote {output}/eval.json and {output}/roc.png")
    return results


def eval_command(args: argparse.Namespace) -> int:
    scores = [c.strip() for c in args.scores.split(",") if c.strip()] if args.scores else None
    directions = {}
    for item in args.direction:
        column, _, way = item.partition("=")
        if way not in ("higher", "lower"):
            raise UserError(f"--direction {item!r}: expected COLUMN=higher or COLUMN=lower")
        directions[column] = way
    try:
        run_eval(args.input, scores, args.output, args.label, args.fpr, directions, args.best_direction,
                 table_source(args))
    except InputError as err:
        raise UserError(str(err)) from None
    return 0
