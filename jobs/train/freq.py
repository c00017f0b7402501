"""Counting a reference corpus into a DC-PDD frequency table, with a pool of Ray actors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa


class BatchCounter:
    """Ray actor: loads the tokenizer once; per batch, the sparse counts of its documents' first ids."""

    def __init__(self, model: str, max_tokens: int, text_column: str) -> None:
        from operators.lm.models import ModelSpec, load_tokenizer, model_vocab_size

        spec = ModelSpec(name="freq", path=model)
        self.tokenizer = load_tokenizer(spec)
        self.vocab_size = model_vocab_size(spec, self.tokenizer)  # |V| = config.vocab_size, as DC-PDD
        self.max_tokens, self.text_column = max_tokens, text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        from operators.membership.math import count_reference_tokens

        texts = [t for t in batch.column(self.text_column).to_pylist() if t and not t.isspace()]
        counts = count_reference_tokens(self.tokenizer, texts, self.max_tokens, self.vocab_size)
        nonzero = np.flatnonzero(counts)
        return pa.table({"token_id": [nonzero.tolist()], "count": [counts[nonzero].tolist()],
                         "docs": [len(texts)], "tokens": [int(counts.sum())]})


def build_frequency_table(input_url: str, model: str, max_tokens: int = 1024, name: str | None = None,
                          text_column: str = "text", concurrency: int | None = None,
                          batch_size: int = 512):
    """Count the corpus on the current Ray cluster; returns (FrequencyTable, documents counted)."""
    import ray
    from ray.data import ActorPoolStrategy

    from operators.lm.models import ModelSpec, load_tokenizer, model_vocab_size, tokenizer_fingerprint
    from operators.membership.math import FrequencyTable
    from pipelines.io import list_shards

    spec = ModelSpec(name="freq", path=model)
    tokenizer = load_tokenizer(spec)
    vocab_size = model_vocab_size(spec, tokenizer)
    shards = list_shards(input_url)
    ds = ray.data.read_parquet(shards).select_columns([text_column])
    # leave a CPU to the read tasks: actors holding every CPU would starve them (a hang)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = concurrency or max(1, min(len(shards), cpus - 1))
    counted = ds.map_batches(BatchCounter, fn_constructor_kwargs={
        "model": model, "max_tokens": max_tokens, "text_column": text_column},
        batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=size), num_cpus=1)
    counts = np.zeros(vocab_size, dtype=np.int64)
    docs = 0
    for part in counted.iter_batches(batch_size=None, batch_format="pyarrow"):
        for ids, values, n in zip(part["token_id"].to_pylist(), part["count"].to_pylist(),
                                  part["docs"].to_pylist(), strict=True):
            np.add.at(counts, np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.int64))
            docs += n
    name = name or _model_name(model)
    source = {"files": shards, "content_sha256": content_hash(shards), "text_column": text_column,
              "documents": docs}
    return FrequencyTable(counts, int(counts.sum()), vocab_size, name, max_tokens,
                          tokenizer_fingerprint(tokenizer), source), docs


def content_hash(urls: list[str]) -> str:
    """sha256 over the files' bytes, in the given order: what a frequency table records it counted."""
    import fsspec

    digest = hashlib.sha256()
    for url in urls:
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _model_name(model: str) -> str:
    return Path(model.rstrip("/")).stem or model
