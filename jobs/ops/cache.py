"""``curate cache stats``: the result cache's tables (entries, bytes) and the recent nights' hits and
misses per cached stage (from their ``runs`` rows)."""

from __future__ import annotations

import argparse
import json

from jobs.errors import UserError
from jobs.ops.target import output_from_args
from pipelines.cache import cache_stats
from pipelines.tables import CatalogError, committed_runs


def night_counts(catalog, nights: int) -> list[dict]:  # noqa: ANN001 - a pyiceberg Catalog
    """Per recent committed night (newest last) and cached stage: hits, misses, hit share."""
    rows = []
    for date, run in sorted(committed_runs(catalog).items())[-nights:]:
        for stage in json.loads(run.get("stages") or "[]"):
            hits, misses = stage.get("cache_hits"), stage.get("cache_misses")
            if hits is None:
                continue
            total = hits + misses
            rows.append({"run_date": date, "run_id": run["run_id"], "stage": stage["name"], "hits": hits,
                         "misses": misses, "hit_share": round(hits / total, 4) if total else None})
    return rows


def cache_command(args: argparse.Namespace) -> int:
    """Print the cache tables and the recent nights' hits and misses."""
    output = output_from_args(args)
    try:
        catalog = output.catalog()
        tables, nights = cache_stats(catalog), night_counts(catalog, args.nights)
    except CatalogError as err:
        raise UserError(str(err)) from None
    if not tables:
        print("no cache tables (nothing cached yet, or cache: {enabled: false})")
    for t in tables:
        per_entry = t["bytes"] / t["entries"] if t["entries"] else 0
        print(f"{t['stage']}  fingerprint {t['fingerprint']}  entries {t['entries']}  files {t['files']}  "
              f"size {t['bytes']} bytes ({per_entry:.0f} bytes/entry)  table {t['table']}")
    for n in nights:
        share = f"{n['hit_share']:.1%}" if n["hit_share"] is not None else "-"
        print(f"{n['run_date']}  {n['stage']}  hits {n['hits']}  misses {n['misses']}  hit share {share}")
    return 0
