"""Token premium (Petrov et al. 2023): tokens a language needs relative to a reference language on parallel text."""

from __future__ import annotations

import math

import polars as pl
import pyarrow as pa

PREMIUM_SCHEMA = pa.schema([
    ("tokenizer", pa.string()), ("lang", pa.string()), ("docs", pa.int64()),
    ("tokens", pa.int64()), ("bytes", pa.int64()), ("chars", pa.int64()),
    ("premium", pa.float64()), ("bytes_per_token", pa.float64()),
    ("chars_per_token", pa.float64()), ("unk_share", pa.float64()), ("byte_fallback_share", pa.float64()),
    ("reliable", pa.bool_()),
])


def premium(ctc_lang: float, ctc_ref: float) -> float:
    """premium(T, L) = CTC(T, L) / CTC(T, ref); NaN when the reference has no tokens."""
    return ctc_lang / ctc_ref if ctc_ref > 0 else math.nan


def premium_table(docs: pl.LazyFrame, tokenizers: list[str], ref_lang: str,
                  max_unk_share: float, lang_column: str = "lang") -> pa.Table:
    """Aggregate per-document counts into one row per (tokenizer, language).

    A parallel corpus: language L counts only its ids that ``ref_lang`` also has, and its premium
    divides by the reference's tokens over *those same ids*, so documents that exist in only one
    language (e.g. the rest of a mixed corpus) never enter a premium. The reference row counts the
    ids it shares with any other language (all its ids when it is the only language) and has
    premium 1. When the reference language is absent the counts are still reported, with a null
    premium.
    """
    docs = docs.select("id", pl.col(lang_column).alias("lang"), "n_bytes", "n_chars",
                       *[pl.col(f"tokens__{t}") for t in tokenizers],
                       *[pl.col(f"fallback_chars__{t}") for t in tokenizers],
                       *[pl.col(f"unk_chars__{t}") for t in tokenizers])
    docs = docs.filter(pl.col("lang").is_not_null()).unique(["id", "lang"], keep="first").collect()
    is_ref = pl.col("lang") == ref_lang
    ref = docs.filter(is_ref)
    others = docs.filter(~is_ref)
    if ref.height:
        ref_tokens = ref.select("id", *[pl.col(f"tokens__{t}").alias(f"ref__{t}") for t in tokenizers])
        others = others.join(ref_tokens, on="id", how="inner")
        shared = others.select("id").unique()
        ref = ref.join(shared, on="id", how="semi") if shared.height else ref
    rows = []
    for t in tokenizers:
        per_lang = pl.concat([ref.with_columns(pl.col(f"tokens__{t}").alias(f"ref__{t}")) if ref.height
                              else ref, others], how="diagonal_relaxed").group_by("lang").agg(
            pl.len().alias("docs"), pl.col(f"tokens__{t}").sum().alias("tokens"),
            pl.col("n_bytes").sum().alias("bytes"), pl.col("n_chars").sum().alias("chars"),
            pl.col(f"fallback_chars__{t}").sum().alias("fallback"),
            pl.col(f"unk_chars__{t}").sum().alias("unk"),
            pl.col(f"ref__{t}").sum().alias("ref_tokens") if ref.height else pl.lit(None).alias("ref_tokens"),
        ).sort("lang")
        rows += [premium_row(t, r, max_unk_share) for r in per_lang.iter_rows(named=True)]
    return pa.Table.from_pylist(rows, schema=PREMIUM_SCHEMA)


def premium_row(tokenizer: str, sums: dict, max_unk_share: float) -> dict:
    """One ``token_premium`` row from a language's sums (docs, tokens, bytes, chars, fallback, unk,
    ref_tokens: the reference's tokens over the same ids, None without a reference):

        premium = tokens / ref_tokens      bytes_per_token = bytes / tokens
        unk_share = unk / chars            byte_fallback_share = fallback / chars
        reliable = unk_share ≤ max_unk_share
    """
    r = sums
    unk_share = r["unk"] / r["chars"] if r["chars"] else 0.0  # UNK only (Petrov et al.)
    fallback_share = r["fallback"] / r["chars"] if r["chars"] else 0.0
    return {
        "tokenizer": tokenizer, "lang": r["lang"], "docs": r["docs"], "tokens": r["tokens"],
        "bytes": r["bytes"], "chars": r["chars"],
        "premium": None if r["ref_tokens"] is None else premium(r["tokens"], r["ref_tokens"]),
        "bytes_per_token": r["bytes"] / r["tokens"] if r["tokens"] else None,
        "chars_per_token": r["chars"] / r["tokens"] if r["tokens"] else None,
        "unk_share": unk_share, "byte_fallback_share": fallback_share,
        "reliable": unk_share <= max_unk_share,
    }


def first_per_id_lang(docs: pl.LazyFrame, lang_column: str = "lang") -> tuple[pl.LazyFrame, int]:
    """One row per (id, lang): the first by (source_file, source_row), nulls first (a parallel
    corpus has one document per id and language); and the number of rows dropped.

    The in-memory reference of what ``premium_partials`` does per block of ids.
    """
    keys = ["id", lang_column]
    names = docs.collect_schema().names()
    order = [c for c in ("source_file", "source_row") if c in names]
    counts = docs.filter(pl.col(lang_column).is_not_null()).select(
        pl.len().alias("rows"), pl.struct(keys).n_unique().alias("unique")).collect()
    docs = docs.sort(order) if order else docs
    return docs.unique(keys, keep="first", maintain_order=True), counts["rows"][0] - counts["unique"][0]


# ---------------------------------------------------------------------------------------------
# The same table from partial sums: ``premium_partials`` runs per block of the run (on the
# cluster), each block holding every row of its ids; the sums are added up per (lang, part) and
# ``premium_from_sums`` applies the parallel-corpus rule to those few numbers.
# ---------------------------------------------------------------------------------------------

#: What a row counts for. ``present``: a row with a language (before de-duplication);
#: ``ref_shared`` / ``ref_alone``: a reference row whose id another language has / has not;
#: ``paired`` / ``unpaired``: another language's row whose id the reference has / has not.
PARTS = ("present", "ref_shared", "ref_alone", "paired", "unpaired")


def count_columns(tokenizers: list[str]) -> list[str]:
    """The per-document counts the premium adds up."""
    return ["n_bytes", "n_chars", *[f"{kind}__{t}" for t in tokenizers
                                    for kind in ("tokens", "fallback_chars", "unk_chars")]]


def premium_partials(docs: pl.DataFrame, tokenizers: list[str], ref_lang: str,
                     lang_column: str = "lang") -> pl.DataFrame:
    """Sums per (lang, part) over ``docs``, which holds *every* row of each of its ids.

    Rows without a language are dropped; (id, lang) duplicates keep the first by (source_file,
    source_row), nulls first (``first_per_id_lang``). Columns: lang, part (``PARTS``), docs, each
    of ``count_columns`` summed, and ``ref__<t>``: the reference's tokens of the row's id (its own
    for a reference row; 0 for ``unpaired``). A null id pairs with nothing.
    """
    counts = count_columns(tokenizers)
    refs = [f"ref__{t}" for t in tokenizers]
    order = [c for c in ("source_file", "source_row") if c in docs.columns]
    docs = docs.select("id", pl.col(lang_column).alias("lang"), *order,
                       *[pl.col(c).cast(pl.Int64) for c in counts]).filter(pl.col("lang").is_not_null())
    present = docs.group_by("lang").agg(pl.len().alias("docs")).with_columns(part=pl.lit("present"))
    docs = (docs.sort(order) if order else docs).unique(["id", "lang"], keep="first", maintain_order=True)
    is_ref = pl.col("lang") == ref_lang
    ref = docs.filter(is_ref)
    ref_tokens = ref.filter(pl.col("id").is_not_null()).select(
        "id", *[pl.col(f"tokens__{t}").alias(f"ref__{t}") for t in tokenizers], paired=pl.lit(True))
    others = docs.filter(~is_ref).join(ref_tokens, on="id", how="left").with_columns(
        part=pl.when(pl.col("paired")).then(pl.lit("paired")).otherwise(pl.lit("unpaired")))
    shared = others.filter(pl.col("part") == "paired").get_column("id").unique()
    ref = ref.with_columns(*[pl.col(f"tokens__{t}").alias(f"ref__{t}") for t in tokenizers],
                           part=pl.when(pl.col("id").is_in(shared.implode()))
                           .then(pl.lit("ref_shared")).otherwise(pl.lit("ref_alone")))
    sums = pl.concat([ref, others.drop("paired")], how="diagonal_relaxed").group_by("lang", "part").agg(
        pl.len().alias("docs"), *[pl.col(c).sum() for c in counts + refs])
    return pl.concat([sums, present], how="diagonal_relaxed").select(
        pl.col("lang").cast(pl.String), pl.col("part").cast(pl.String), pl.col("docs").cast(pl.Int64),
        *[pl.col(c).fill_null(0).cast(pl.Int64) for c in counts + refs])


def premium_from_sums(sums: pl.DataFrame, tokenizers: list[str], ref_lang: str,
                      max_unk_share: float) -> pa.Table:
    """``premium_table`` from the run's ``premium_partials`` added up per (lang, part).

    With a reference: it counts its ``ref_shared`` rows (its ``ref_alone`` ones when no id is
    shared at all), every other language its ``paired`` rows. Without one: every row, premium null.
    """
    def docs_in(part: str) -> int:
        return int(sums.filter(pl.col("part") == part)["docs"].sum()) if sums.height else 0

    has_ref = docs_in("ref_shared") + docs_in("ref_alone") > 0
    if has_ref:
        ref_part = "ref_shared" if docs_in("ref_shared") else "ref_alone"
        counted = sums.filter(pl.col("part").is_in([ref_part, "paired"]))
    else:
        counted = sums.filter(pl.col("part").is_in(["paired", "unpaired"]))
    rows = []
    for t in tokenizers:
        per_lang = counted.group_by("lang").agg(
            pl.col("docs").sum(), pl.col(f"tokens__{t}").sum().alias("tokens"),
            pl.col("n_bytes").sum().alias("bytes"), pl.col("n_chars").sum().alias("chars"),
            pl.col(f"fallback_chars__{t}").sum().alias("fallback"),
            pl.col(f"unk_chars__{t}").sum().alias("unk"), pl.col(f"ref__{t}").sum().alias("ref_tokens"),
        ).filter(pl.col("docs") > 0).sort("lang")
        for r in per_lang.iter_rows(named=True):
            rows.append(premium_row(t, r if has_ref else {**r, "ref_tokens": None}, max_unk_share))
    return pa.Table.from_pylist(rows, schema=PREMIUM_SCHEMA)
