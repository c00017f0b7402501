"""Which output a reader verb reads: ``--output``, a pipeline's ``output`` section, ``--catalog``.

Every reader (query, tables, report, maintain, quarantine replay, table inputs) takes the same three
options, so a shared catalog (Postgres, REST, Glue...) and an object store are as readable as a
local output:

* ``--pipeline FILE``: the pipeline's ``output`` section (url, catalog, storage); only that section
  is read, so a reader needs none of the stages' models or assets;
* ``--catalog KEY=VALUE`` (repeatable): pyiceberg catalog properties, e.g. ``type=sql``
  ``uri=postgresql+psycopg2://…``;
* ``--storage KEY=VALUE`` (repeatable): object store settings (``endpoint``, ``region``, ``key``,
  ``secret``; default: the AWS_* environment variables);
* ``--output URL``: the output URL (overrides the pipeline's).
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from jobs.errors import UserError
from pipelines.config import ConfigError, OutputConfig, format_validation_error, load_output_config
from pipelines.tables import Output, open_output


def parse_pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UserError(f"{option} takes KEY=VALUE, got {value!r}")
        pairs[key.strip()] = val
    return pairs


def pipeline_output(path: str) -> OutputConfig:
    """The validated ``output`` section of a pipeline YAML (the rest is not read)."""
    try:
        return load_output_config(path)
    except ConfigError as err:
        raise UserError(str(err)) from None


def output_from_args(args: argparse.Namespace) -> Output:
    """The output a reader verb names (see the module docstring)."""
    pipeline = getattr(args, "output_pipeline", None)
    section = pipeline_output(pipeline) if pipeline else None
    catalog = dict(section.catalog) if section else {}
    catalog |= parse_pairs(getattr(args, "catalog", None) or [], "--catalog")
    storage = section.storage.model_dump(exclude_none=True) if section and section.storage else {}
    storage |= parse_pairs(getattr(args, "storage", None) or [], "--storage")
    url = args.output or (section.url if section else None) or getattr(args, "default_output", "./output")
    try:
        return open_output(url, catalog, storage or None)
    except ValidationError as err:
        raise UserError(format_validation_error(err, "--storage")) from None


def as_output(output: str | Output) -> Output:
    """``output`` as an ``Output`` (a plain URL: the embedded catalog, storage from the environment)."""
    return output if isinstance(output, Output) else open_output(output)
