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
import time

from jobs.cli.verbs import verb
from jobs.errors import UserError
from jobs.train.freq import build_frequency_table
from pipelines.runner import connect_ray

log = logging.getLogger("curate.freq")


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "freq", "token frequency tables of a reference corpus (for DC-PDD)",
             "curate freq build --input s3://bucket/reference/ --model MODEL_DIR --output freq.parquet")
    actions = p.add_subparsers(dest="freq_action", required=True, metavar="ACTION")
    b = verb(actions, "build", "count a Parquet corpus's tokens on Ray into a table",
             "curate freq build --input s3://bucket/reference/ --model MODEL_DIR --output freq.parquet")
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


def freq_build_command(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError
    from pipelines.io import InputError

    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    start = time.perf_counter()
    try:
        connect_ray(args.address)
        table, docs = build_frequency_table(args.input, args.model, args.max_tokens, args.name,
                                            args.text_column, args.concurrency, args.batch_size)
    except (InputError, ConfigError, ValueError, OSError) as err:
        raise UserError(str(err)) from None
    table.save(args.output)
    seen = int((table.counts > 0).sum())
    print(f"frequency table {args.output}: model {table.model}, {docs} docs, N = {table.n_tokens} tokens "
          f"(first {table.max_tokens_per_doc} per doc), |V| = {table.vocab_size} ({seen} ids seen) "
          f"in {time.perf_counter() - start:.1f} s; tokenizer {table.tokenizer_fingerprint}, "
          f"content sha256 {table.source['content_sha256'][:16]}")
    return 0
