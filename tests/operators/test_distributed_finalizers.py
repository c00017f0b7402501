"""The finalizers on the cluster (Ray Data) equal their in-memory reference functions.

The references are the pure functions the hand-computed tests pin (``select_documents``,
``first_per_id_lang`` + ``premium_table``); here both run on a few thousand random rows with
ties, NaN and null scores, null lineage, duplicate (id, lang) rows and ids without a reference
side, split over many Ray blocks.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from operators.selection import (
    SELECTED_SCHEMA,
    Position,
    ThresholdPolicy,
    TopFractionCharsPolicy,
    TopPercentPolicy,
    select_dataset,
    select_documents,
)
from operators.token_premium.math import (
    PREMIUM_SCHEMA,
    first_per_id_lang,
    premium_from_sums,
    premium_partials,
    premium_table,
)
from operators.token_premium.stage import premium_sums

BLOCKS = 23


def _blocks(table: pa.Table, n: int = BLOCKS) -> list[pa.Table]:
    """``table`` cut into ``n`` slices of uneven size (some empty)."""
    cuts = sorted(np.random.default_rng(1).integers(0, table.num_rows, n - 1).tolist())
    bounds = [0, *cuts, table.num_rows]
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _collect(rows: pa.Table | object) -> pa.Table:
    import ray

    if isinstance(rows, pa.Table):
        return rows
    tables = ray.get(rows.to_arrow_refs())
    return pa.concat_tables(tables).sort_by("rank").cast(SELECTED_SCHEMA)


def _documents(n: int = 3000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 12, n) / 11.0  # 12 distinct values: many ties
    score[rng.random(n) < 0.05] = np.nan
    scores = [None if rng.random() < 0.03 else float(s) for s in score]
    ids = [None if rng.random() < 0.01 else f"d{rng.integers(0, n // 3):05d}" for _ in range(n)]
    files = [None if rng.random() < 0.02 else f"shard-{rng.integers(0, 4)}.parquet" for _ in range(n)]
    rows = [None if rng.random() < 0.02 else int(r) for r in rng.integers(0, 50, n)]
    n_chars = [None if rng.random() < 0.02 else int(c) for c in rng.integers(0, 400, n)]
    return pa.table({"id": ids, "score": pa.array(scores, pa.float64()), "n_chars": pa.array(n_chars, pa.int64()),
                     "source_file": files, "source_row": pa.array(rows, pa.int64())})


POLICIES = [ThresholdPolicy(threshold=0.5), TopFractionCharsPolicy(fraction=0.0),  # nothing kept
            TopFractionCharsPolicy(fraction=0.137), TopPercentPolicy(percent=5)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_distributed_selection_equals_the_reference(policy, local_ray):
    import ray

    docs = _documents()
    expected = select_documents(pl.LazyFrame(pl.from_arrow(docs)), "score", "op", policy)
    got = _collect(select_dataset(ray.data.from_arrow(_blocks(docs)), "score", "op", policy))
    assert expected.num_rows == got.num_rows
    assert got.equals(expected), (got.slice(0, 5).to_pylist(), expected.slice(0, 5).to_pylist())


def test_distributed_selection_counts_text_when_there_is_no_n_chars_column(local_ray):
    import ray

    docs = _documents(800, seed=3)
    docs = docs.drop_columns(["n_chars"]).append_column(
        "text", pa.array(["é" * (i % 37) for i in range(docs.num_rows)]))
    policy = TopFractionCharsPolicy(fraction=0.25)
    expected = select_documents(pl.LazyFrame(pl.from_arrow(docs)), "score", "op", policy)
    got = _collect(select_dataset(ray.data.from_arrow(_blocks(docs, 7)), "score", "op", policy))
    assert expected.num_rows > 10 and got.equals(expected)


def test_ordered_mask_continues_the_runs_running_sums_by_hand():
    # a block after 8 of the run's 20 characters; fraction 0.5 -> budget 10. Characters before
    # each row: 8, 9, 11 -> the first two are kept (the second crosses the budget).
    at = Position(rows_before=3, chars_before=8, scored_rows=40, total_chars=20)
    keep = TopFractionCharsPolicy(fraction=0.5).ordered_mask(np.array([0.4, 0.3, 0.3]), np.array([1, 2, 3]), at)
    assert keep.tolist() == [True, True, False]
    # 5% of 40 scored rows = 2: rows 3, 4, 5 of the run are past it
    assert not TopPercentPolicy(percent=5).ordered_mask(np.zeros(3), np.zeros(3), at).any()
    assert TopPercentPolicy(percent=10).ordered_mask(np.zeros(3), np.zeros(3), at).tolist() == [True, False, False]


# --------------------------------------------------------------------------------- token premium

LANGS = ["eng_Latn", "fra_Latn", "deu_Latn", "swh_Latn"]


def _parallel_corpus(n: int = 4000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [None if rng.random() < 0.01 else f"p{rng.integers(0, n // 3):05d}" for _ in range(n)]
    langs = [None if rng.random() < 0.02 else LANGS[i] for i in rng.integers(0, len(LANGS), n)]
    cols = {"id": ids, "lang": langs,
            "source_file": [None if rng.random() < 0.01 else f"s{rng.integers(0, 5)}" for _ in range(n)],
            "source_row": pa.array(rng.permutation(n), pa.int64()),
            "n_bytes": pa.array(rng.integers(1, 900, n), pa.int64()),
            "n_chars": pa.array(rng.integers(1, 500, n), pa.int64())}
    for t in ("a", "b"):
        cols[f"tokens__{t}"] = pa.array(rng.integers(0, 300, n), pa.int64())
        cols[f"fallback_chars__{t}"] = pa.array(rng.integers(0, 5, n), pa.int64())
        cols[f"unk_chars__{t}"] = pa.array(rng.integers(0, 80, n), pa.int64())
    return pa.table(cols)


def _reference(docs: pa.Table) -> tuple[pa.Table, int]:
    deduped, duplicates = first_per_id_lang(pl.LazyFrame(pl.from_arrow(docs)))
    return premium_table(deduped, ["a", "b"], "eng_Latn", 0.1), duplicates


def _cases() -> dict[str, pa.Table]:
    docs = _parallel_corpus()
    lang = pl.from_arrow(docs)["lang"]
    ref_ids = set(pl.from_arrow(docs).filter(lang == "eng_Latn")["id"].drop_nulls())
    return {
        "mixed": docs,
        "no reference": docs.filter(pa.array((lang != "eng_Latn").fill_null(True).to_list())),
        "reference only": docs.filter(pa.array((lang == "eng_Latn").fill_null(False).to_list())),
        # other languages only on ids the reference lacks: no id is shared
        "nothing shared": docs.filter(pa.array(
            [(la == "eng_Latn") or (i not in ref_ids) for la, i in zip(lang, docs.column("id").to_pylist(),
                                                                       strict=True)])),
    }


@pytest.mark.parametrize("case", ["mixed", "no reference", "reference only", "nothing shared"])
def test_distributed_premium_equals_the_reference(case, local_ray):
    import ray

    docs = _cases()[case]
    expected, duplicates = _reference(docs)
    sums = premium_sums(ray.data.from_arrow(_blocks(docs)), ["a", "b"], "eng_Latn", "lang", partitions=5)
    got = premium_from_sums(sums, ["a", "b"], "eng_Latn", 0.1)
    assert duplicates > 0 and expected.num_rows > 0
    assert got.schema == PREMIUM_SCHEMA
    assert got.to_pylist() == expected.to_pylist()
    present = sums.filter(pl.col("part") == "present")
    assert present["docs"].sum() - sums.filter(pl.col("part") != "present")["docs"].sum() == duplicates
    assert sorted(present["lang"]) == sorted(set(docs.column("lang").drop_null().to_pylist()))


def test_premium_partials_of_blocks_of_whole_ids_add_up_to_the_whole():
    """Without Ray: per-block partials over blocks that each hold every row of their ids."""
    docs = pl.from_arrow(_parallel_corpus(1200, seed=5))
    whole = premium_partials(docs, ["a", "b"], "eng_Latn").sort("lang", "part")
    bucket = docs.with_columns(b=pl.col("id").hash(seed=1) % 4)
    parts = pl.concat([premium_partials(g, ["a", "b"], "eng_Latn") for _, g in bucket.group_by("b")])
    summed = parts.group_by("lang", "part").agg(pl.all().sum()).sort("lang", "part")
    assert summed.equals(whole.select(summed.columns))
    expected, _ = _reference(docs.to_arrow())
    assert premium_from_sums(summed, ["a", "b"], "eng_Latn", 0.1).to_pylist() == expected.to_pylist()
    eng = [r for r in expected.to_pylist() if r["lang"] == "eng_Latn"]
    assert [r["premium"] for r in eng] == [1.0, 1.0]  # the reference against itself, per tokenizer


# ------------------------------------------------- small runs: the same code, one block, on the driver


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_small_run_selection_on_the_driver_equals_the_reference(policy):
    from operators.selection import select_table

    docs = _documents()
    expected = select_documents(pl.LazyFrame(pl.from_arrow(docs)), "score", "op", policy)
    assert select_table(docs, "score", "op", policy).equals(expected)


@pytest.mark.parametrize("case", ["mixed", "no reference", "reference only", "nothing shared"])
def test_small_run_premium_on_the_driver_equals_the_reference(case):
    from operators.aggregate import sum_partials
    from operators.token_premium.stage import block_partials, typed_counts

    docs = _cases()[case]
    expected, _ = _reference(docs)
    partials = block_partials(typed_counts(docs, ["a", "b"], "lang"), ["a", "b"], "eng_Latn")
    got = premium_from_sums(sum_partials(partials, ["lang", "part"]), ["a", "b"], "eng_Latn", 0.1)
    assert got.to_pylist() == expected.to_pylist()
