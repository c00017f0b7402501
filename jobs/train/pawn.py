"""PAWN training input: the feature cache, read from a feature file or made from a ``documents`` table."""

from __future__ import annotations

import pyarrow as pa

from jobs.errors import UserError


def load_features(url: str, model: str | None = None, tables: dict | None = None) -> pa.Table:
    """The feature cache at ``url``, converting an lm documents table when ``model`` is given
    (``tables``: ``catalog``/``storage`` of a committed-table input on a shared catalog)."""
    from operators.detection.features import features_from_documents
    from operators.detection.pawn import METRIC_NAMES
    from pipelines.tables import open_dataset, read_table

    cache = ["metrics", "hidden", "label"]
    tables = tables or {}
    if set(cache) <= set(open_dataset(url, **tables).schema.names):
        return read_table(url, cache, **tables)
    if not model:
        raise UserError(f"{url} is not a feature cache (metrics, hidden, label); for an lm documents "
                        "table pass --model with the lm stage's model name")
    columns = [f"{model}__{k}" for k in METRIC_NAMES] + [f"{model}__hidden_last", "label"]
    try:
        return features_from_documents(read_table(url, columns, **tables), model)
    except ValueError as err:
        raise UserError(f"{url}: {err}") from None
