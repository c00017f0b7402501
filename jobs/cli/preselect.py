"""``curate preselect label|train``: PreSelect training labels and the fastText scorer.

    curate preselect label --family family.yaml --input URL --output labels.parquet [--max-docs N]
    curate preselect train --labels labels.parquet --output model.bin [--epoch 3 --lr 0.1 ...]

``label`` runs ONE pipeline over a sample with one ``lm`` stage per family model
(``keep_positions: false``), then per document d and model i

    BPC_i(d) = L_i(d) / (n_chars(d) · ln 2),   L_i(d) = <model>__nll_sum (nats)

and S(d) (``operators.preselect.predictive_strength``). Positives: S = 1; negatives: as many
lowest-S documents (``choose_labels``). The score stage is ``op: preselect``
(``operators/preselect/stage.py``).
"""

from __future__ import annotations

import argparse
import json

from jobs.cli.verbs import verb
from jobs.errors import UserError
from jobs.train.preselect import (
    CHARS_PER_TOKEN,
    DEFAULT_BUCKET,
    label_documents,
    load_family,
    train_from_labels,
)
from operators.preselect.scorer import ScorerTrainReport
from pipelines.io import InputError

# ------------------------------------------------------------------------------------------ CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "preselect", "PreSelect: label with a model family, train the scorer",
             "curate preselect label --family family.yaml --input corpus/ --output labels.parquet",
             "curate preselect train --labels labels.parquet --output model.bin")
    cmds = p.add_subparsers(dest="preselect_command", required=True, metavar="STEP")

    lab = verb(cmds, "label", "predictive strength and fastText labels for a sample",
             "curate preselect label --family family.yaml --input corpus/ --output labels.parquet "
             "--max-docs 2000")
    lab.add_argument("--family", required=True, help="family YAML: models {name, path, backend, bench_score}")
    lab.add_argument("--input", required=True, help="Parquet shards (fsspec URL)")
    lab.add_argument("--output", required=True, help="labels Parquet to write")
    lab.add_argument("--max-docs", type=int, help="sample size: the first N readable documents")
    lab.add_argument("--max-tokens", type=int, default=1024, help="tokens per document (default 1024)")
    lab.add_argument("--max-chars", type=int, help=f"chars scored per document (default {CHARS_PER_TOKEN}·max-tokens)")
    lab.add_argument("--n-positive", type=int, help="positives (S = 1) to keep (default: balanced)")
    lab.add_argument("--n-negative", type=int, help="negatives (lowest S) to keep (default: balanced)")
    lab.add_argument("--batch-size", type=int, default=16, help="documents per model batch (default 16)")
    lab.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else embedded Ray)")
    lab.set_defaults(func=label_command)

    tr = verb(cmds, "train", "train the fastText scorer; print held-out precision/recall",
             "curate preselect train --labels labels.parquet --output model.bin")
    tr.add_argument("--labels", required=True, help="labels Parquet from `curate preselect label`")
    tr.add_argument("--output", required=True, help="fastText model .bin (path or fsspec URL)")
    tr.add_argument("--epoch", type=int, default=3)
    tr.add_argument("--lr", type=float, default=0.1)
    tr.add_argument("--word-ngrams", type=int, default=2)
    tr.add_argument("--dim", type=int, default=100)
    tr.add_argument("--bucket", type=int, default=DEFAULT_BUCKET,
                    help=f"n-gram hash buckets (default {DEFAULT_BUCKET}: an 80 MB model at dim 100)")
    tr.add_argument("--min-count", type=int, default=1)
    tr.add_argument("--valid-fraction", type=float, default=0.1, help="held out for precision/recall")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--thread", type=int, default=1, help="fastText threads (1: reproducible)")
    tr.set_defaults(func=train_command)


def label_command(args: argparse.Namespace) -> int:
    family = load_family(args.family)
    try:
        label_documents(family, args.input, args.output, max_docs=args.max_docs, max_tokens=args.max_tokens,
                        max_chars=args.max_chars, n_positive=args.n_positive, n_negative=args.n_negative,
                        batch_size=args.batch_size, address=args.address)
    except InputError as err:
        raise UserError(str(err)) from None
    return 0


def train_command(args: argparse.Namespace) -> int:
    report = train_from_labels(args.labels, args.output, epoch=args.epoch, lr=args.lr,
                               word_ngrams=args.word_ngrams, dim=args.dim, bucket=args.bucket,
                               min_count=args.min_count, valid_fraction=args.valid_fraction,
                               seed=args.seed, thread=args.thread)
    print(format_train_report(report))
    return 0


def format_train_report(report: ScorerTrainReport) -> str:
    """What ``train`` prints: sizes, held-out precision and recall of label 1, the model path."""
    return (f"trained on {report.n_train} documents, held out {report.n_valid}\n"
            f"held-out precision {report.precision:.3f}  recall {report.recall:.3f}  (label 1, P >= 0.5)\n"
            f"model: {report.model_path}\n" + json.dumps(report.__dict__))

