"""Token premium: how many more tokens a language costs than a reference language.

Petrov et al. 2023 ("Language Model Tokenizers Introduce Unfairness Between Languages") and
Arnett et al. ("Explaining and Mitigating Crosslingual Tokenizer Inequities"):

    CTC(T, L)     = Σ_{d in L} tokens_T(d)            corpus token count of language L under T
    premium(T, L) = CTC(T, L) / CTC(T, ref)           ref = eng_Latn by default

Both sums run over a *parallel* corpus: only ids that exist in language L and in the reference
language are counted, so the same content is compared. Also reported: bytes/token, chars/token
and unk_share = the share of characters that fall in unknown or byte-fallback tokens; a share
above ``max_unk_share`` (10%, as Petrov et al.) marks the row ``reliable = false``.

Per document the stage adds ``n_bytes``, ``n_chars`` and, per tokenizer ``<t>``,
``tokens__<t>`` and ``fallback_chars__<t>``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import polars as pl
import pyarrow as pa
from pydantic import Field

from operators.base import MiB, RunFailed, StageConfig
from operators.tokenizers import TokenizerSpec, load_tokenizer

PREMIUM_SCHEMA = pa.schema([
    ("tokenizer", pa.string()), ("lang", pa.string()), ("docs", pa.int64()),
    ("tokens", pa.int64()), ("bytes", pa.int64()), ("chars", pa.int64()),
    ("premium", pa.float64()), ("bytes_per_token", pa.float64()),
    ("chars_per_token", pa.float64()), ("unk_share", pa.float64()), ("reliable", pa.bool_()),
])


def premium(ctc_lang: float, ctc_ref: float) -> float:
    """premium(T, L) = CTC(T, L) / CTC(T, ref); NaN when the reference has no tokens."""
    return ctc_lang / ctc_ref if ctc_ref > 0 else math.nan


class TokenCountsConfig(StageConfig):
    """Count tokens per document under each tokenizer; build the ``token_premium`` table."""

    op: Literal["token_premium"] = "token_premium"
    tokenizers: list[TokenizerSpec] = Field(min_length=1)
    ref_lang: str = "eng_Latn"
    max_unk_share: float = Field(0.10, ge=0, le=1)
    lang_column: str = "lang"
    #: Measured (bench/stage_memory.py): 444 MiB peak USS with three tokenizers (an HF one, cl100k,
    #: o200k); Ray Data asks for 1.25x that. Per tokenizer on top of the worker's own ~190 MiB.
    default_memory: ClassVar[int] = 256 * MiB
    tokenizer_memory: ClassVar[int] = 128 * MiB

    def memory_bytes(self) -> int:
        return self.resources.memory or self.default_memory + self.tokenizer_memory * len(self.tokenizers)

    def provides(self) -> list[str]:
        cols = ["n_bytes", "n_chars"]
        return cols + [f"{kind}__{t.name}" for t in self.tokenizers for kind in ("tokens", "fallback_chars")]

    def build(self) -> TokenCounter:
        return TokenCounter(self.tokenizers)

    def finalize(self, ctx) -> dict[str, pa.Table]:
        docs = ctx.scan_documents()
        if self.lang_column not in docs.collect_schema().names():
            return {"token_premium": PREMIUM_SCHEMA.empty_table()}
        present = docs.select(pl.col(self.lang_column).drop_nulls().unique()).collect().to_series().to_list()
        if present and self.ref_lang not in present:
            raise RunFailed(f"{self.stage_name}.ref_lang: {self.ref_lang!r} is not in the data, so every "
                            f"premium would be null; languages present: {sorted(present)}")
        table = premium_table(docs, [t.name for t in self.tokenizers], self.ref_lang,
                              self.max_unk_share, self.lang_column)
        if table.num_rows:
            from operators.premium_chart import plot_premium

            plot_premium(table, ctx.report_dir / "token_premium.png", self.ref_lang)
        return {"token_premium": table}


class TokenCounter:
    """The operator: counts per document, for every configured tokenizer."""

    def __init__(self, specs: list[TokenizerSpec]) -> None:
        self.tokenizers = {spec.name: load_tokenizer(spec) for spec in specs}

    def output_schema(self) -> pa.Schema:
        fields = [("n_bytes", pa.int64()), ("n_chars", pa.int64())]
        for name in self.tokenizers:
            fields += [(f"tokens__{name}", pa.int64()), (f"fallback_chars__{name}", pa.int64())]
        return pa.schema(fields)

    def process(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        columns: dict[str, list[int]] = {
            "n_bytes": [len(t.encode("utf-8")) for t in texts],
            "n_chars": [len(t) for t in texts],
        }
        for name, tokenizer in self.tokenizers.items():
            counted = tokenizer.count_batch(texts)
            columns[f"tokens__{name}"] = [c.tokens for c in counted]
            columns[f"fallback_chars__{name}"] = [c.fallback_chars for c in counted]
        return pa.table(columns, schema=self.output_schema())


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
                       *[pl.col(f"fallback_chars__{t}") for t in tokenizers])
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
            pl.col(f"ref__{t}").sum().alias("ref_tokens") if ref.height else pl.lit(None).alias("ref_tokens"),
        ).sort("lang")
        for r in per_lang.iter_rows(named=True):
            unk_share = r["fallback"] / r["chars"] if r["chars"] else 0.0
            rows.append({
                "tokenizer": t, "lang": r["lang"], "docs": r["docs"], "tokens": r["tokens"],
                "bytes": r["bytes"], "chars": r["chars"],
                "premium": None if r["ref_tokens"] is None else premium(r["tokens"], r["ref_tokens"]),
                "bytes_per_token": r["bytes"] / r["tokens"] if r["tokens"] else None,
                "chars_per_token": r["chars"] / r["tokens"] if r["tokens"] else None,
                "unk_share": unk_share, "reliable": unk_share <= max_unk_share,
            })
    return pa.Table.from_pylist(rows, schema=PREMIUM_SCHEMA)
