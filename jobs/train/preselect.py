"""PreSelect labelling and training: score documents with a model family on the pipeline, label by predictive strength, train the fastText scorer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import Field, ValidationError, field_validator

from jobs.errors import UserError
from operators.base import Resources, StrictModel
from operators.lm.models import Backend, DType
from operators.preselect.math import bits_per_char, choose_labels, predictive_strength
from operators.preselect.scorer import ScorerTrainReport
from pipelines.config import PipelineConfig, format_validation_error, parse_config
from pipelines.io import list_shards, read_shard, url_to_fs, write_parquet
from pipelines.runner import init_ray, run_pipeline
from pipelines.tables import committed_table_files

#: fastText hash buckets for word n-grams: 200k × dim 100 × 4 B = 80 MB (fastText's 2M: 800 MB).
DEFAULT_BUCKET = 200_000
_ROOT = Path(__file__).resolve().parents[2]
#: Texts are cut to this many characters per ``max_tokens`` before scoring, so no model truncates.
CHARS_PER_TOKEN = 3


# ------------------------------------------------------------------------------------ the family


class FamilyMember(StrictModel):
    """One reference model: an ``lm`` engine model plus its benchmark score (higher is better)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    path: str
    backend: Backend = "torch"
    dtype: DType = "auto"
    bench_score: float
    layers: int | None = Field(None, description="Informational (the demo family's depth).")
    resources: Resources | None = Field(None, description="Default: an even share of the CPUs.")

    @field_validator("bench_score")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("bench_score must be finite")
        return value


class Family(StrictModel):
    """N ≥ 3 reference models; ``benchmark`` says how ``bench_score`` was measured (free-form)."""

    models: list[FamilyMember] = Field(min_length=3)
    benchmark: dict[str, Any] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[FamilyMember]) -> list[FamilyMember]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return models

    def tied_pairs(self) -> list[tuple[str, str]]:
        """Pairs with equal benchmark scores: with any, no document can reach S = 1."""
        return [(a.name, b.name) for a, b in combinations(self.models, 2) if a.bench_score == b.bench_score]


def load_family(path: str | Path) -> Family:
    """Read and validate a family YAML (UserError naming the field on problems)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"family file not found: {path}")
    try:
        return Family.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as err:
        raise UserError(format_validation_error(err, str(path))) from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None


# ------------------------------------------------------------------------- scoring with the family


def clip_text(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters, cut back to the last whitespace in the second half."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return cut[:space] if space > max_chars // 2 else cut


def sample_documents(input_url: str, max_docs: int | None = None) -> tuple[pa.Table, int]:
    """The first ``max_docs`` readable documents (shard order) as (id, text); and dropped duplicates."""
    ids, texts, seen, dupes = [], [], set(), 0
    for url in list_shards(input_url):
        for batch in read_shard(url):
            good = batch.filter(pc.is_null(batch.column("quarantine_reason")))
            for doc_id, text in zip(good.column("id").to_pylist(), good.column("text").to_pylist(), strict=True):
                if max_docs is not None and len(ids) >= max_docs:
                    return pa.table({"id": ids, "text": texts}), dupes
                if doc_id in seen:
                    dupes += 1
                    continue
                seen.add(doc_id)
                ids.append(doc_id)
                texts.append(text)
    return pa.table({"id": ids, "text": texts}), dupes


def cpu_share(n_models: int) -> float:
    """CPUs per model actor when all run at once: (cluster CPUs − 1 read task − 0.5 writer) / N."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.05, math.floor(100 * (total - 1.5) / n_models) / 100)


def family_pipeline(family: Family, input_url: str, output_url: str, max_tokens: int,
                    metrics: list[str], keep_positions: bool, batch_size: int) -> PipelineConfig:
    """One pipeline: an ``lm`` stage per model (stage ``lm_<name>``), sized to share the cluster."""
    share = cpu_share(len(family.models))
    stages = []
    for m in family.models:
        resources = m.resources or Resources(num_cpus=share, batch_size=batch_size)
        stages.append({"op": "lm", "model": {"name": m.name, "path": m.path, "backend": m.backend,
                                             "dtype": m.dtype},
                       "max_tokens": max_tokens, "metrics": metrics, "keep_positions": keep_positions,
                       # every member scores every content token, whatever its tokenizer's BOS policy
                       "score_first_token": True, "resources": resources.model_dump()})
    return parse_config({"name": "preselect-family", "input": {"url": input_url},
                         "output": {"url": output_url}, "stages": stages}, "<preselect family>")


def score_with_family(family: Family, docs: pa.Table, max_tokens: int, *, metrics: tuple[str, ...] = ("logprob",),
                      keep_positions: bool = False, batch_size: int = 16, address: str | None = None,
                      log=print) -> pl.DataFrame:
    """Run ``docs`` (id, text) through every family model in one Ray pipeline; its documents table.

    Rows the pipeline quarantined (e.g. an engine error) are absent from the result.
    """
    with tempfile.TemporaryDirectory(prefix="curate-preselect-") as tmp:
        (Path(tmp) / "input").mkdir()
        pq.write_table(docs, Path(tmp) / "input" / "part-00000.parquet")
        probe = PipelineConfig(name="preselect-family", input={"url": f"{tmp}/input"},
                               ray={"address": address})
        init_ray(probe)
        cfg = family_pipeline(family, f"{tmp}/input", f"{tmp}/out", max_tokens, list(metrics),
                              keep_positions, batch_size)
        start = time.perf_counter()
        result = run_pipeline(cfg, time.strftime("%Y-%m-%d"))
        log(f"scored {result.rows_out} of {docs.num_rows} documents with {len(family.models)} models "
            f"in {time.perf_counter() - start:.1f} s (quarantined {result.rows_quarantined})")
        files = committed_table_files(f"{tmp}/out/documents") or []  # the committed documents table
        return pl.concat([pl.read_parquet(f.removeprefix("file://")).drop("run_date", strict=False)
                          for f in files], how="diagonal_relaxed") if files \
            else pl.DataFrame({"id": [], "text": []}, schema={"id": pl.String, "text": pl.String})


# --------------------------------------------------------------------------------------- labels


def label_frame(family: Family, docs: pa.Table, scored: pl.DataFrame, n_positive: int | None = None,
                n_negative: int | None = None) -> tuple[pl.DataFrame, Counter, np.ndarray]:
    """Predictive strength and labels for the sample ``docs`` (id, text, scored_text).

    Returns the labelled rows, the skip counts, and S of every sampled document (NaN if skipped).

    A document is skipped (and counted by reason) when any model has no finite loss
    (``missing_loss``) or cut its text at ``max_tokens`` (``truncated``: the losses would cover
    different spans). By default both classes get min(#S=1, #other) documents.
    """
    names = [m.name for m in family.models]
    base = pl.from_arrow(docs).with_columns(pl.col("scored_text").str.len_chars().alias("n_chars"))
    cols = [c for n in names for c in (f"{n}__nll_sum", f"{n}__truncated")]
    frame = base.join(scored.select("id", *[c for c in cols if c in scored.columns]), on="id", how="left")
    for c in cols:  # a model whose stage quarantined every row left no column at all
        if c not in frame.columns:
            frame = frame.with_columns(pl.lit(None).alias(c))
    loss = np.column_stack([frame[f"{n}__nll_sum"].cast(pl.Float64).fill_null(np.nan).to_numpy() for n in names])
    truncated = np.column_stack([frame[f"{n}__truncated"].fill_null(False).to_numpy() for n in names])
    bpc = bits_per_char(loss, frame["n_chars"].to_numpy()[:, None])
    missing, cut = ~np.isfinite(bpc).all(axis=1), truncated.any(axis=1)
    skipped = Counter(missing_loss=int(missing.sum()), truncated=int((cut & ~missing).sum()))
    usable = ~missing & ~cut
    strength = np.full(len(frame), np.nan)
    strength[usable] = predictive_strength(bpc[usable], np.array([m.bench_score for m in family.models]))
    if n_positive is None and n_negative is None:
        n_positive = n_negative = min(int((strength == 1).sum()), int((usable & (strength < 1)).sum()))
    pos, neg = choose_labels(frame["id"].to_numpy(), strength, n_positive, n_negative)
    label = {**{i: 1 for i in pos}, **{i: 0 for i in neg}}
    frame = frame.with_columns(
        pl.Series("S", strength), pl.col("id").replace_strict(label, default=None, return_dtype=pl.Int8).alias("label"),
        *[pl.Series(f"{n}__bpc", bpc[:, k]) for k, n in enumerate(names)])
    out = frame.filter(pl.col("label").is_not_null()).sort(["label", "S", "id"], descending=[True, False, False])
    return out.select("id", "text", "S", "label", "n_chars",
                      *[c for n in names for c in (f"{n}__nll_sum", f"{n}__bpc")]), skipped, strength


def label_documents(family: Family, input_url: str, output: str, *, max_docs: int | None = None,
                    max_tokens: int = 1024, max_chars: int | None = None, n_positive: int | None = None,
                    n_negative: int | None = None, batch_size: int = 16, address: str | None = None,
                    log=print) -> pl.DataFrame:
    """Sample, score with every model in one pipeline, label, write ``output``; return the labels."""
    for a, b in family.tied_pairs():
        print(f"warning: models {a} and {b} have the same bench_score: no document can reach S = 1, "
              "so there will be no positives", file=sys.stderr)
    docs, dupes = sample_documents(input_url, max_docs)
    if docs.num_rows == 0:
        raise UserError(f"no readable documents in {input_url}")
    max_chars = max_chars or CHARS_PER_TOKEN * max_tokens
    docs = docs.append_column("scored_text", pa.array([clip_text(t, max_chars) for t in docs.column("text").to_pylist()]))
    log(f"sample: {docs.num_rows} documents from {input_url} (texts cut to {max_chars} chars for scoring"
        + (f"; {dupes} repeated ids dropped)" if dupes else ")"))
    scored_input = docs.select(["id", "scored_text"]).rename_columns(["id", "text"])
    scored = score_with_family(family, scored_input, max_tokens, batch_size=batch_size, address=address, log=log)
    return write_labels(family, docs, scored, output, max_tokens=max_tokens, n_positive=n_positive,
                        n_negative=n_negative, log=log)


def write_labels(family: Family, docs: pa.Table, scored: pl.DataFrame, output: str, *, max_tokens: int,
                 n_positive: int | None = None, n_negative: int | None = None, log=print) -> pl.DataFrame:
    """Label ``docs`` (id, text, scored_text) from the family's losses ``scored`` (``label_frame``),
    say how, write ``output``; return the labels."""
    labels, skipped, strength = label_frame(family, docs, scored, n_positive, n_negative)
    n_skipped = sum(skipped.values())
    log(f"skipped {n_skipped} documents (missing a model's loss: {skipped['missing_loss']}, "
        f"truncated at max_tokens={max_tokens}: {skipped['truncated']})")
    log("S distribution: " + ", ".join(f"{s:.3g}: {n}" for s, n in sorted(Counter(
        np.round(strength[np.isfinite(strength)], 6).tolist()).items())))
    n_pos = int((labels["label"] == 1).sum())
    log(f"labels: {n_pos} positive (S = 1), {labels.height - n_pos} negative (lowest S)")
    write_parquet(*url_to_fs(output), labels.to_arrow())
    log(f"wrote {output}")
    return labels


# ---------------------------------------------------------------------------------------- train


# The child of ``train_isolated``: imports only the scorer module, trains, writes the report.
_TRAIN_CHILD = """
import json, sys
import pyarrow.parquet as pq
from operators.preselect.scorer import train_scorer
job = json.load(open(sys.argv[1]))
data = pq.read_table(job["data"])
try:
    report = train_scorer(data.column("text").to_pylist(), data.column("label").to_pylist(), job["out"],
                          **job["kwargs"]).__dict__
except ValueError as err:
    report = {"error": str(err)}
json.dump(report, open(job["report"], "w"))
"""


def train_isolated(texts: list[str], labels: list[int], out_path: str, **kwargs: Any) -> ScorerTrainReport:
    """``train_scorer`` in a fresh Python process (same interpreter; errors come back as ValueError).

    fastText 0.9.3 training is reproducible only as the first training in a process: a second
    one in the same process (or after other libraries, e.g. torch, were loaded) can give other
    weights, NaN weights, or stop with "Encountered NaN". A fresh process makes ``seed`` mean what
    it says. (A subprocess, not multiprocessing: spawn would re-import the caller's ``__main__``.)
    """
    with tempfile.TemporaryDirectory(prefix="curate-train-") as tmp:
        job = Path(tmp) / "job.json"
        pq.write_table(pa.table({"text": texts, "label": pa.array(labels, pa.int64())}), f"{tmp}/data.parquet")
        job.write_text(json.dumps({"data": f"{tmp}/data.parquet", "out": str(out_path), "kwargs": kwargs,
                                   "report": f"{tmp}/report.json"}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, str(job)], capture_output=True, text=True,
                              env=env, check=False)
        report_file = Path(tmp) / "report.json"
        if not report_file.exists():
            raise RuntimeError(f"fastText training process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        report = json.loads(report_file.read_text())
    if "error" in report:
        raise ValueError(report["error"])
    return ScorerTrainReport(**report)


def train_from_labels(labels_url: str, output: str, **kwargs: Any) -> ScorerTrainReport:
    """Train on a labels Parquet (``text``, ``label``); ``output`` is a path or fsspec URL.

    ``kwargs`` go to ``train_scorer``; ``bucket`` defaults to ``DEFAULT_BUCKET``.
    """
    kwargs.setdefault("bucket", DEFAULT_BUCKET)
    fs, path = url_to_fs(labels_url)
    if not fs.exists(path):
        raise UserError(f"labels not found: {labels_url}")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=None)
    missing = {"text", "label"} - set(table.column_names)
    if missing:
        raise UserError(f"{labels_url}: missing columns {sorted(missing)} (write it with `curate preselect label`)")
    texts, labels = table.column("text").to_pylist(), table.column("label").to_pylist()
    out_fs, out_path = url_to_fs(output)
    local = out_fs.protocol in ("file", ("file", "local"))
    with tempfile.TemporaryDirectory(prefix="curate-fasttext-") as tmp:
        target = out_path if local else os.path.join(tmp, "model.bin")
        try:
            report = train_isolated(texts, labels, target, **kwargs)
        except ValueError as err:
            raise UserError(f"{labels_url}: {err}") from None
        if not local:
            out_fs.put_file(target, out_path)
    return report
