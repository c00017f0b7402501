"""``curate quarantine replay --date D PIPELINE``: rerun a night's quarantined rows through the pipeline.

The night's committed ``quarantine`` rows become one input shard: ``id``, ``text`` (as bytes, so text
that was not valid UTF-8 is replayed from ``text_bytes`` as it was read), the input's own columns, and
the quarantine record as ``input_source_file``, ``input_source_row``, ``input_quarantine_reason`` and
``input_quarantine_stage``. Stage-made columns are dropped (the stages compute them again). The
current pipeline runs on that shard as an ordinary run of date D into a separate output
(``--into``, default ``<output>/replays/<D>``, with its own embedded catalog), so the night's own
tables are never touched. Its error budget is off (a replay reports how many rows still fail), and
finalizers skip whole-corpus checks (``token_premium.ref_lang`` need not be among the replayed rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import EqualTo

from jobs.errors import UserError
from jobs.ops.summary import format_summary
from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.io import InputError, input_name, write_parquet
from pipelines.lock import LockHeld
from pipelines.runner import RunFailed, RunResult, run_pipeline
from pipelines.tables import CatalogError, committed_runs, load_table, open_output, output_of_config

#: Columns of the quarantine record, kept as ``input_<name>`` in the replay input.
RECORD = ("source_file", "source_row", "quarantine_reason", "quarantine_stage")
#: Columns the reader makes again (dropped from the replay input).
DROPPED = ("run_date", "text_bytes", "n_control_chars", "rows_lost")


@dataclass
class ReplayResult:
    """The replay run, and how many quarantined rows went in."""

    run: RunResult
    rows_in: int
    input_url: str


def quarantined_rows(cfg: PipelineConfig, run_date: str) -> pa.Table:
    """The committed ``quarantine`` rows of ``run_date`` (the snapshot its latest committed run recorded)."""
    output = output_of_config(cfg)
    try:
        catalog = output.catalog()
    except CatalogError as err:
        raise UserError(str(err)) from None
    run = committed_runs(catalog).get(run_date)
    snapshot = json.loads(run["snapshots"] or "{}").get("quarantine") if run else None
    table = load_table(catalog, "quarantine")
    if run is None:
        raise UserError(f"no committed run of {run_date} in {cfg.output.url}")
    if snapshot is None or table is None:
        raise UserError(f"the committed night {run_date} in {cfg.output.url} has no quarantined rows")
    return table.scan(row_filter=EqualTo("run_date", run_date), snapshot_id=snapshot).to_arrow()


def replay_input(rows: pa.Table, cfg: PipelineConfig) -> pa.Table:
    """The quarantined ``rows`` as an input shard for ``cfg`` (see the module docstring)."""
    made = {c for stage in cfg.stages for c in stage.provides()}
    text = rows.column("text").cast(pa.binary()) if "text" in rows.column_names else pa.nulls(len(rows), pa.binary())
    if "text_bytes" in rows.column_names:
        text = pc.if_else(pc.is_valid(text), text, rows.column("text_bytes").cast(pa.binary()))
    keep = [c for c in rows.column_names if c not in (*DROPPED, "text") and c not in made]
    out = rows.select(keep).append_column("text", text)
    taken = set(out.column_names)
    names = []
    for c in out.column_names:
        if c in RECORD:
            c = input_name(c, taken)
            taken.add(c)
        names.append(c)
    return out.rename_columns(names)


def replay(cfg: PipelineConfig, run_date: str, into: str | None = None,
           into_catalog: dict | None = None, allow_shrink: bool = False) -> ReplayResult:
    """Run ``cfg`` on the quarantined rows of ``run_date``, committing into ``into`` (its catalog:
    ``into_catalog``, default the embedded one; the storage settings are the night's). A rerun that
    would shrink an earlier replay of that date is refused unless ``allow_shrink``
    (``pipelines.guards``)."""
    rows = quarantined_rows(cfg, run_date)
    if into is None:
        if cfg.output.catalog or not output_of_config(cfg).is_local:
            raise UserError("the output is not a local path: name the replay's own output with --into URL "
                            "(and its catalog with --into-catalog KEY=VALUE)")
        into = f"{cfg.output.url.rstrip('/')}/replays/{run_date}"
    if into_catalog and into_catalog == {k: str(v) for k, v in cfg.output.catalog.items()}:
        raise UserError("--into-catalog is the night's own catalog: a replay needs a catalog of its own "
                        "(its tables would replace the night's)")
    into_fs, into_root = open_output(into, None, cfg.output.storage).fs, open_output(into).root
    shard = f"{into_root.rstrip('/')}/_input/quarantine-{run_date}.parquet"
    write_parquet(into_fs, shard, replay_input(rows, cfg))
    shard_url = shard if "file" in (into_fs.protocol if isinstance(into_fs.protocol, tuple)
                                    else (into_fs.protocol,)) else into_fs.unstrip_protocol(shard)
    replayed = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"url": shard_url, "text_column": "text", "id_column": "id"}),
        "output": cfg.output.model_copy(update={"url": into, "catalog": into_catalog or {}}),
        "max_quarantine_share": 1.0,
        "stages": [s.model_copy(update={"max_quarantine_share": None}) if hasattr(s, "max_quarantine_share")
                   else s for s in cfg.stages],
    })
    return ReplayResult(run_pipeline(replayed, run_date, partial=True, allow_shrink=allow_shrink),
                        rows.num_rows, shard_url)


def replay_command(args: argparse.Namespace) -> int:
    overrides = {"output": {"url": args.output}, "ray": {"address": args.address}}
    try:
        cfg = load_config(args.pipeline, overrides)
        from jobs.ops.target import parse_pairs

        result = replay(cfg, args.date, args.into, parse_pairs(args.into_catalog, "--into-catalog"),
                        getattr(args, "allow_shrink", False))
    except (ConfigError, InputError, LockHeld, CatalogError) as err:
        raise UserError(str(err)) from None
    except RunFailed as err:
        print(f"curate: error: replay failed, nothing committed: {err}", file=sys.stderr)
        return 1
    run = result.run
    print(format_summary(run))
    print(f"replay of {args.date}: {result.rows_in} quarantined row(s) in, {run.rows_out} out, "
          f"{run.rows_quarantined} still quarantined; tables under {run.output_url}")
    return 0
