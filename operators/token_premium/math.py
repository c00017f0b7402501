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
        for r in per_lang.iter_rows(named=True):
            unk_share = r["unk"] / r["chars"] if r["chars"] else 0.0  # UNK only (Petrov et al.)
            fallback_share = r["fallback"] / r["chars"] if r["chars"] else 0.0
            rows.append({
                "tokenizer": t, "lang": r["lang"], "docs": r["docs"], "tokens": r["tokens"],
                "bytes": r["bytes"], "chars": r["chars"],
                "premium": None if r["ref_tokens"] is None else premium(r["tokens"], r["ref_tokens"]),
                "bytes_per_token": r["bytes"] / r["tokens"] if r["tokens"] else None,
                "chars_per_token": r["chars"] / r["tokens"] if r["tokens"] else None,
                "unk_share": unk_share, "byte_fallback_share": fallback_share,
                "reliable": unk_share <= max_unk_share,
            })
    return pa.Table.from_pylist(rows, schema=PREMIUM_SCHEMA)
