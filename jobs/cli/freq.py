"""``curate freq build``: count a reference corpus's tokens into a FrequencyTable (for DC-PDD).

    curate freq build --input s3://bucket/reference/ --model ~/.cache/curate/demo/smollm2-135m-instruct \\
        --output s3://bucket/freq/smollm2.parquet [--max-tokens 1024]

A Ray Data job: the Parquet shards are read in parallel, an actor pool tokenises each batch with the
target model's tokenizer (``add_special_tokens=False``, exactly the ids the ``lm`` stage scores after
its BOS) and counts the first ``max_tokens`` ids of each document with ``np.bincount``; the driver
sums the per-batch counts. The table records N (tokens counted) and |V| (``len(tokenizer)``), the
two numbers of DC-PDD's Laplace-smoothed frequency f(x) = (count(x) + 1) / (N + |V|).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.cli import UserError

log = logging.getLogger("curate.freq")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("freq", help="token frequency tables (DC-PDD reference corpus)")
    actions = p.add_subparsers(dest="freq_action", required=True, metavar="ACTION")
    b = actions.add_parser("build", help="count a Parquet corpus's tokens on Ray into a FrequencyTable")
    b.add_argument("--input", required=True, help="Parquet file or directory of the reference corpus")
    b.add_argument("--model", required=True, help="the target model: local dir, .gguf file or Hub id")
    b.add_argument("--output", required=True, help="FrequencyTable Parquet file to write (fsspec URL)")
    b.add_argument("--max-tokens", type=int, default=1024, help="count the first N tokens per doc (1024)")
    b.add_argument("--name", help="model name recorded in the table (default: the model dir's name)")
    b.add_argument("--text-column", default="text")
    b.add_argument("--concurrency", type=int, default=None, help="tokenizer actors (default: CPUs - 1)")
    b.add_argument("--batch-size", type=int, default=512)
    b.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded Ray)")
    b.set_defaults(func=freq_build_command)
    d = actions.add_parser("demo", help="build (or reuse) the demo table <cache>/demo/freq/smollm2.parquet")
    d.set_defaults(func=lambda _args: print(prepare_demo_freq()) or 0)


class BatchCounter:
    """Ray actor: loads the tokenizer once; per batch, the sparse counts of its documents' first ids."""

    def __init__(self, model: str, max_tokens: int, text_column: str) -> None:
        from operators.lm.models import ModelSpec, load_tokenizer

        self.tokenizer = load_tokenizer(ModelSpec(name="freq", path=model))
        self.vocab_size = len(self.tokenizer)
        self.max_tokens, self.text_column = max_tokens, text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [t for t in batch.column(self.text_column).to_pylist() if t and not t.isspace()]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        flat = np.fromiter((i for row in ids for i in row[: self.max_tokens]), dtype=np.int64)
        counts = np.bincount(flat, minlength=self.vocab_size)
        nonzero = np.flatnonzero(counts)
        return pa.table({"token_id": [nonzero.tolist()], "count": [counts[nonzero].tolist()],
                         "docs": [len(texts)], "tokens": [int(flat.size)]})


def build_frequency_table(input_url: str, model: str, max_tokens: int = 1024, name: str | None = None,
                          text_column: str = "text", concurrency: int | None = None,
                          batch_size: int = 512):
    """Count the corpus on the current Ray cluster; returns (FrequencyTable, documents counted)."""
    import ray
    from ray.data import ActorPoolStrategy

    from operators.lm.models import ModelSpec, load_tokenizer
    from operators.membership import FrequencyTable
    from pipelines.io import list_shards

    vocab_size = len(load_tokenizer(ModelSpec(name="freq", path=model)))
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
    return FrequencyTable(counts, int(counts.sum()), vocab_size, name, max_tokens), docs


def prepare_demo_freq(cache: Path | None = None, log=print) -> Path:
    """``<cache>/demo/freq/smollm2.parquet``: the demo corpus counted with the demo model's tokenizer.

    In-process (no Ray: ~800 short docs); a demo stand-in for a large general reference corpus.
    """
    import pyarrow.parquet as pq

    from jobs.demo_assets import build_demo_asset
    from operators.membership import FrequencyTable

    def build(tmp: Path, model: Path, corpus: Path) -> dict:
        counter = BatchCounter(str(model), 1024, "text")
        sparse = counter(pq.read_table(corpus, columns=["text"]))
        counts = np.zeros(counter.vocab_size, dtype=np.int64)
        counts[sparse["token_id"][0].as_py()] = sparse["count"][0].as_py()
        table = FrequencyTable(counts, int(counts.sum()), counter.vocab_size, "smollm2", 1024)
        table.save(str(tmp / "smollm2.parquet"))
        log(f"demo freq: {table.n_tokens} tokens counted from {corpus}")
        return {"source": str(corpus), "n_tokens": table.n_tokens}

    return build_demo_asset("freq", build, cache, log) / "smollm2.parquet"


def _model_name(model: str) -> str:
    return Path(model.rstrip("/")).stem or model


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def freq_build_command(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError
    from pipelines.io import InputError

    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    start = time.perf_counter()
    try:
        _init_ray(args.address)
        table, docs = build_frequency_table(args.input, args.model, args.max_tokens, args.name,
                                            args.text_column, args.concurrency, args.batch_size)
    except (InputError, ConfigError, ValueError, OSError) as err:
        raise UserError(str(err)) from None
    table.save(args.output)
    seen = int((table.counts > 0).sum())
    print(f"frequency table {args.output}: model {table.model}, {docs} docs, N = {table.n_tokens} tokens "
          f"(first {table.max_tokens_per_doc} per doc), |V| = {table.vocab_size} ({seen} ids seen) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
