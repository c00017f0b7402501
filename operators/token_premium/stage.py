"""Token premium: how many more tokens a language costs than a reference language.

Petrov et al. 2023 ("Language Model Tokenizers Introduce Unfairness Between Languages") and
Arnett et al. ("Explaining and Mitigating Crosslingual Tokenizer Inequities"):

    CTC(T, L)     = Σ_{d in L} tokens_T(d)            corpus token count of language L under T
    premium(T, L) = CTC(T, L) / CTC(T, ref)           ref = eng_Latn by default

Both sums run over a *parallel* corpus: only ids that exist in language L and in the reference
language are counted, so the same content is compared. Also reported: bytes/token, chars/token
unk_share = the share of characters that fall in the unknown token (UNK only, as Petrov et al.
count: a share above ``max_unk_share``, 10%, marks the row ``reliable = false``), and
byte_fallback_share = the share split into raw bytes or byte pieces (reported, never decides
``reliable``: byte-level BPEs keep that text, Petrov et al. keep those rows).

Per document the stage adds ``n_bytes``, ``n_chars`` and, per tokenizer ``<t>``,
``tokens__<t>``, ``fallback_chars__<t>`` (byte-fallback) and ``unk_chars__<t>`` (UNK).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import polars as pl
import pyarrow as pa
from pydantic import Field

from operators.base import MiB, RunFailed, StageConfig
from operators.token_premium.math import PREMIUM_SCHEMA, premium_table
from operators.token_premium.tokenizers import TokenizerSpec, load_tokenizer

log = logging.getLogger("curate.token_premium")


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
    cache_ignore: ClassVar[frozenset[str]] = StageConfig.cache_ignore | {"ref_lang", "max_unk_share", "lang_column"}
    cache_packages: ClassVar[tuple[str, ...]] = ("tokenizers", "transformers", "tiktoken", "sentencepiece")

    def memory_bytes(self) -> int:
        return self.resources.memory or self.default_memory + self.tokenizer_memory * len(self.tokenizers)

    def provides(self) -> list[str]:
        cols = ["n_bytes", "n_chars"]
        return cols + [f"{kind}__{t.name}" for t in self.tokenizers for kind in ("tokens", "fallback_chars", "unk_chars")]

    def build(self) -> TokenCounter:
        return TokenCounter(self.tokenizers)

    def finalize(self, ctx) -> dict[str, pa.Table]:
        docs = ctx.scan_documents()
        if self.lang_column not in docs.collect_schema().names():
            return {"token_premium": PREMIUM_SCHEMA.empty_table()}
        present = docs.select(pl.col(self.lang_column).drop_nulls().unique()).collect().to_series().to_list()
        if present and self.ref_lang not in present and not getattr(ctx, "partial", False):
            raise RunFailed(f"{self.stage_name}.ref_lang: {self.ref_lang!r} is not in the data, so every "
                            f"premium would be null; languages present: {sorted(present)}")
        docs = self._deduplicated(docs)
        table = premium_table(docs, [t.name for t in self.tokenizers], self.ref_lang,
                              self.max_unk_share, self.lang_column)
        if table.num_rows:
            from operators.token_premium.chart import plot_premium

            plot_premium(table, ctx.report_dir / "token_premium.png", self.ref_lang)
        return {"token_premium": table}


    def _deduplicated(self, docs: pl.LazyFrame) -> pl.LazyFrame:
        """One row per (id, lang): the first by (source_file, source_row), with a warning naming the
        count of duplicates (a parallel corpus has one document per id and language)."""
        keys = ["id", self.lang_column]
        names = docs.collect_schema().names()
        order = [c for c in ("source_file", "source_row") if c in names]
        counts = docs.filter(pl.col(self.lang_column).is_not_null()).select(
            pl.len().alias("rows"), pl.struct(keys).n_unique().alias("unique")).collect()
        duplicates = counts["rows"][0] - counts["unique"][0]
        if duplicates:
            log.warning("%s: %d duplicate (id, %s) row(s); the premium counts the first of each by "
                        "(source_file, source_row)", self.stage_name, duplicates, self.lang_column)
        docs = docs.sort(order) if order else docs
        return docs.unique(keys, keep="first", maintain_order=True)


class TokenCounter:
    """The operator: counts per document, for every configured tokenizer."""

    def __init__(self, specs: list[TokenizerSpec]) -> None:
        self.tokenizers = {spec.name: load_tokenizer(spec) for spec in specs}

    def output_schema(self) -> pa.Schema:
        fields = [("n_bytes", pa.int64()), ("n_chars", pa.int64())]
        for name in self.tokenizers:
            fields += [(f"tokens__{name}", pa.int64()), (f"fallback_chars__{name}", pa.int64()),
                       (f"unk_chars__{name}", pa.int64())]
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
            columns[f"unk_chars__{name}"] = [c.unk_chars for c in counted]
        return pa.table(columns, schema=self.output_schema())
