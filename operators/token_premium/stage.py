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
from typing import TYPE_CHECKING, ClassVar, Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from operators.aggregate import colocated, fold_sums, partitions_for, sum_partials
from operators.base import MiB, RunFailed, StageConfig
from operators.token_premium.math import (
    PREMIUM_SCHEMA,
    count_columns,
    premium_from_sums,
    premium_partials,
)
from operators.token_premium.tokenizers import TokenizerSpec, load_tokenizer

if TYPE_CHECKING:
    import ray

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
        """The ``token_premium`` table: per-document counts added up on the cluster
        (``premium_sums``); the driver holds one row of sums per (language, part)."""
        names = ctx.documents_schema().names
        if self.lang_column not in names:
            return {"token_premium": PREMIUM_SCHEMA.empty_table()}
        tokenizers = [t.name for t in self.tokenizers]
        columns = ["id", self.lang_column, *[c for c in ("source_file", "source_row") if c in names],
                   *count_columns(tokenizers)]
        if ctx.on_cluster:
            sums = premium_sums(ctx.documents_dataset(columns), tokenizers, self.ref_lang, self.lang_column,
                                partitions_for(ctx.documents_rows()))
        else:  # a small run: the same per-block code, the run as one block on the driver
            typed = typed_counts(ctx.documents_table(columns), tokenizers, self.lang_column)
            sums = sum_partials(block_partials(typed, tokenizers, self.ref_lang), ["lang", "part"])
        if not sums.height:
            return {"token_premium": PREMIUM_SCHEMA.empty_table()}
        present = sums.filter(pl.col("part") == "present")
        languages = sorted(present["lang"].to_list())
        if languages and self.ref_lang not in languages and not getattr(ctx, "partial", False):
            raise RunFailed(f"{self.stage_name}.ref_lang: {self.ref_lang!r} is not in the data, so every "
                            f"premium would be null; languages present: {languages}")
        duplicates = present["docs"].sum() - sums.filter(pl.col("part") != "present")["docs"].sum()
        if duplicates:
            log.warning("%s: %d duplicate (id, %s) row(s); the premium counts the first of each by "
                        "(source_file, source_row)", self.stage_name, duplicates, self.lang_column)
        table = premium_from_sums(sums, tokenizers, self.ref_lang, self.max_unk_share)
        if table.num_rows:
            from operators.token_premium.chart import plot_premium

            plot_premium(table, ctx.report_dir / "token_premium.png", self.ref_lang)
        return {"token_premium": table}


def typed_counts(batch: pa.Table, tokenizers: list[str], lang_column: str) -> pa.Table:
    """The columns the premium reads, with one type in every block (a column a file lacks is null):
    id, lang (from ``lang_column``), the lineage present, the counts as int64."""
    columns = {"id": pc.cast(batch.column("id"), pa.string()),
               "lang": pc.cast(batch.column(lang_column), pa.string())}
    for name, kind in (("source_file", pa.string()), ("source_row", pa.int64())):
        if name in batch.column_names:
            columns[name] = pc.cast(batch.column(name), kind)
    for name in count_columns(tokenizers):
        columns[name] = (pc.cast(batch.column(name), pa.int64()) if name in batch.column_names
                         else pa.nulls(batch.num_rows, pa.int64()))
    return pa.table(columns)


def block_partials(block: pa.Table, tokenizers: list[str], ref_lang: str) -> pa.Table:
    """``premium_partials`` of one block that holds every row of its ids."""
    return premium_partials(pl.from_arrow(block), tokenizers, ref_lang).to_arrow()


def premium_sums(docs: ray.data.Dataset, tokenizers: list[str], ref_lang: str, lang_column: str,
                 partitions: int) -> pl.DataFrame:
    """The run's ``premium_partials`` summed per (lang, part), computed on the cluster: the rows
    are hash-partitioned by id (every language of an id in one block, for the parallel-corpus
    rule and the de-duplication), each block sums its own; the driver adds the blocks' sums."""
    typed = docs.map_batches(typed_counts, fn_kwargs={"tokenizers": tokenizers, "lang_column": lang_column},
                             batch_size=None, batch_format="pyarrow")
    partials = colocated(typed, "id", partitions).map_batches(
        block_partials, fn_kwargs={"tokenizers": tokenizers, "ref_lang": ref_lang},
        batch_size=None, batch_format="pyarrow")
    return fold_sums(partials, ["lang", "part"])


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
