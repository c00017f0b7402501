"""Per-document membership and detection scores from the ``lm`` stage's per-token columns (CPU).

The ``lm`` stage runs model ``M`` once per document and leaves per-position arrays (row j scores
token x_{j+1}: ``M__logprob`` lp, ``M__entropy`` H, ``M__logp2``, ``M__rank``, ``M__xent`` with an
observer, and ``M__token_ids`` = x_0 … x_n, BOS first). This stage maps them onto the pure
functions of ``operators.membership.math`` and ``operators.detection.math``; every formula lives there.

    - op: scores
      model: smollm2                    # which lm columns to read (the lm stage's model.name)
      min_k: 0.2
      dcpdd: {freq_table: ${CURATE_CACHE}/freq/smollm2.parquet, a: 0.01}   # optional
      zlib: true
      binoculars: false                 # true needs an lm ``observer`` (M__xent)
      gltr: false                       # true: GLTR's rank histogram (4 columns)
      lowercase: {enabled: false, model: smollm2_lower}

Output columns (float64; null when the document had no scored position):

    M__ppl            exp(-mean lp)                                   lower ⇒ member / machine
    M__mink           Min-K% Prob: mean of the lowest k·n lp          (Shi et al. 2024)       higher ⇒ member
    M__minkpp         Min-K%++: lowest k·n of (lp-μ)/σ                (Zhang et al. 2025)     higher ⇒ member
    M__zlib           log PPL / zlib bytes of the scored span         (Carlini et al. 2021)   lower ⇒ member
    M__dcpdd          DC-PDD β = mean_first-occurrence min(-p·ln f, a) (Zhang et al. 2024)    higher ⇒ member
    M__mean_entropy   mean H                                          (GLTR, DetectGPT)       higher ⇒ machine
    M__mean_log_rank  mean ln rank                                    (GLTR, DetectGPT)       lower ⇒ machine
    M__gltr_top10     share of tokens of rank ≤ 10  (gltr: true)      (GLTR)                  higher ⇒ machine
    M__gltr_top100 / _top1000 / _rest   … of rank 11–100 / 101–1000 / > 1000  (GLTR)          lower ⇒ machine
    M__binoculars     mean NLL / mean xent (xent: all n positions)    (Hans et al. 2024)      lower ⇒ machine
    M__lowercase      log PPL(x) / log PPL(lower(x))                  (Carlini et al. 2021)   lower ⇒ member

zlib compresses exactly the text the log-probs score: the lm stage's ``text_column`` (read from
the lm stage this stage is bound to), cut after the last kept token where the lm stage cut the
document at ``max_tokens`` (``M__truncated``; ``TextEncoder.scored_text``).

Lowercase needs a second LM pass over lower(text), which doubles the model cost: a
``lowercase_text`` stage adds ``text_lower``, a second ``lm`` stage (its own model name, e.g.
``smollm2_lower``, reading ``text_column: text_lower``) scores it, and ``lowercase.model`` names
that second prefix here.

No silent estimates. vLLM's cheaper ``vllm.mode: prompt_logprobs`` gives only top-k estimates of
the entropy and of E[ln²p] (``entropy_topk`` / ``logp2_topk``), and Min-K%++ from them is a
different number: on Zipf-like logits (V = 49,152, k = 20) σ is off by 1.3–3.8% on average and the
per-token z by a median of 7–39% (docs/methods/membership.md, "Min-K%++ from top-k estimates"). The stage reads
them only with ``allow_topk_estimates: true``, and then names what it computes from them for
what it is:

    M__minkpp_topk          Min-K%++ with μ, σ from the top-k estimates            higher ⇒ member
    M__mean_entropy_topk    mean of the top-k entropy estimate                     higher ⇒ machine

(in place of ``M__minkpp`` / ``M__mean_entropy``). Without it, a plan whose lm stage gives only
estimates fails before Ray starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import fsspec
import numpy as np
import pyarrow as pa
from pydantic import Field, PrivateAttr, field_validator, model_validator

from operators.arrow import ragged
from operators.base import MiB, Need, PlanError, Resources, StageConfig, StrictModel
from operators.detection.math import binoculars_score, gltr_buckets, mean_entropy, mean_log_rank
from operators.lm.models import (
    ModelSpec,
    TextEncoder,
    load_text_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)
from operators.membership.math import (
    FrequencyTable,
    dcpdd_score,
    lowercase_ratio,
    min_k_plus_plus,
    min_k_prob,
    perplexity,
    zlib_ratio,
)

log = logging.getLogger("curate.scores")

#: Which way each score points, from its definition (the table above): "higher" means a higher
#: score says positive (member of the training data, or machine-written), "lower" the opposite.
#: Keyed by the column's suffix after ``<model>__`` (``pawn_score``: the PAWN head's default
#: column, P(machine-written)). ``curate eval`` reports every score in this direction.
SCORE_DIRECTIONS: dict[str, Literal["higher", "lower"]] = {
    "ppl": "lower", "mink": "higher", "minkpp": "higher", "minkpp_topk": "higher", "zlib": "lower",
    # higher entropy => machine, as the reference code that defines the entropy baseline has it:
    # DetectGPT's run.py (eric-mitchell/detect-gpt) feeds get_entropy to its ROC as is, with
    # machine-written = 1, and negates only the rank baselines
    "dcpdd": "higher", "mean_entropy": "higher", "mean_log_rank": "lower", "binoculars": "lower",
    "lowercase": "lower", "pawn_score": "higher", "mean_entropy_topk": "higher",
    # GLTR (Gehrmann et al. 2019): machine text has more top-10 tokens, human text more in the rest
    "gltr_top10": "higher", "gltr_top100": "lower", "gltr_top1000": "lower", "gltr_rest": "lower",
}
#: GLTR's bins, in the order of ``gltr_buckets``.
GLTR_COLUMNS = ("gltr_top10", "gltr_top100", "gltr_top1000", "gltr_rest")


def score_direction(column: str) -> Literal["higher", "lower"] | None:
    """The registered direction of a score column (``M__ppl`` -> "lower"), or None if unknown."""
    return SCORE_DIRECTIONS.get(column.split("__", 1)[-1])
_PREFIX = r"^[A-Za-z][A-Za-z0-9_]*$"
#: Exact metric -> vLLM prompt_logprobs mode's estimate of it (used when the exact column is absent).
_ESTIMATES = {"entropy": "entropy_topk", "logp2": "logp2_topk"}
#: float32 rank fractions c/V carry ~1e-7 relative error: c·(1 ± 1e-7) must round to c.
_RANK_TOLERANCE = 1e-3
_INFER_MIN_POSITIONS = 64

class DcpddOptions(StrictModel):
    """DC-PDD: a reference-corpus FrequencyTable (``curate freq build``) and the cap ``a``."""

    freq_table: str = Field(description="FrequencyTable Parquet file (any fsspec URL).")
    a: float = Field(0.01, gt=0, description="Upper bound of each token's calibrated score.")

    @field_validator("freq_table")
    @classmethod
    def _exists(cls, url: str) -> str:
        fs, path = fsspec.core.url_to_fs(url)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        if local and not fs.exists(path):
            raise ValueError(f"frequency table not found: {url} (build one with `curate freq build`)")
        return url


class LowercaseOptions(StrictModel):
    """Carlini et al.'s lowercase ratio; ``model`` is the prefix of the lm stage that scored lower(text)."""

    enabled: bool = False
    model: str | None = Field(None, pattern=_PREFIX, description="Column prefix of the lowercase lm pass.")

    @model_validator(mode="after")
    def _model_when_enabled(self) -> LowercaseOptions:
        if self.enabled and not self.model:
            raise ValueError("lowercase.model is required when lowercase.enabled is true: the name of "
                             "the second lm stage's model that scored text_lower")
        return self


class ScoresConfig(StageConfig):
    """Membership (DC-PDD, Min-K%, Min-K%++, zlib, lowercase) and zero-shot detection scores."""

    op: Literal["scores"] = "scores"
    model: str = Field(pattern=_PREFIX, description="The lm stage's model.name (column prefix).")
    min_k: float = Field(0.2, gt=0, le=1, description="k of Min-K% and Min-K%++.")
    dcpdd: DcpddOptions | None = None
    zlib: bool = True
    binoculars: bool = Field(False, description="Needs an lm observer (the M__xent column).")
    gltr: bool = Field(False, description="GLTR's rank histogram: M__gltr_top10 / _top100 / _top1000 / _rest.")
    lowercase: LowercaseOptions = LowercaseOptions()
    vocab_size: int | None = Field(
        None, gt=0, description="V of the model's logits, for mean_log_rank; default: from the ranks.")
    allow_topk_estimates: bool = Field(
        False, description="Read the vLLM top-k estimates (entropy_topk, logp2_topk) and write "
                           "M__minkpp_topk / M__mean_entropy_topk instead of the exact scores.")
    cpu_only: ClassVar[bool] = True
    default_memory: ClassVar[int] = 384 * MiB  # measured: 215 MiB peak USS, plus a DC-PDD table
    resources: Resources = Resources(num_cpus=1, concurrency=1, batch_size=256)
    _lm: object | None = PrivateAttr(None)  # the lm stage whose columns we read (set by ``bind``)

    @property
    def text_column(self) -> str:
        """The column the lm stage scored (its ``text_column``; ``text`` when not bound to one)."""
        return getattr(self._lm, "text_column", "text")

    @property
    def stage_name(self) -> str:
        return self.name or f"scores_{self.model}"

    def requires(self) -> list[Need]:
        m = self.model

        def lm(metric: str, field: str = "model", value: object = m, hint: str = "") -> Need:
            if metric in _ESTIMATES and self.allow_topk_estimates:
                return Need((f"{m}__{_ESTIMATES[metric]}",), "allow_topk_estimates", True,
                            f"an lm stage for {m!r} with vllm.mode: prompt_logprobs (top-k estimates); with exact "
                            "metrics leave allow_topk_estimates false")
            hint = hint or (f"an earlier lm stage with model.name {m!r} that computes {metric!r} exactly "
                            "(either backend, not vllm.mode: prompt_logprobs; with keep_positions: true)" + (
                                f"; vLLM's {_ESTIMATES[metric]!r} estimate is used only with "
                                "allow_topk_estimates: true" if metric in _ESTIMATES else ""))
            return Need((f"{m}__{metric}",), field, value, hint, prefix=field == "model")

        needs = [lm("logprob"), lm("entropy"), lm("logp2"), lm("rank")]
        if self.zlib:
            needs.append(lm("truncated"))
        if self.dcpdd is not None:
            needs.append(lm("token_ids"))
        if self.binoculars:
            needs.append(lm("xent", "binoculars", True, f"an lm stage for {m!r} with an `observer`"))
        if self.lowercase.enabled:
            low = self.lowercase.model
            needs.append(Need((f"{low}__logprob",), "lowercase.model", low,
                              f"a second lm stage (model.name {low!r}, text_column: text_lower) after a "
                              "lowercase_text stage", prefix=True))
        return needs

    def bind(self, earlier: list[StageConfig]) -> ScoresConfig:
        """Keep the lm stage whose columns we read (zlib reads its text column and tokenizer); DC-PDD:
        the frequency table must come from that stage's tokenizer."""
        lm = next((s for s in reversed(earlier) if s.op == "lm" and s.model.name == self.model), None)
        if lm is not None and self.dcpdd is not None:
            check_freq_table_tokenizer(self.dcpdd.freq_table, lm.model)
        bound = self.model_copy()
        bound._lm = lm
        return bound

    def score_names(self) -> list[str]:
        """Column suffixes this stage writes (``_topk`` for scores made from top-k estimates)."""
        est = "_topk" if self.allow_topk_estimates else ""
        names = ["ppl", "mink", f"minkpp{est}"] + (["zlib"] if self.zlib else [])
        names += (["dcpdd"] if self.dcpdd is not None else []) + [f"mean_entropy{est}", "mean_log_rank"]
        names += list(GLTR_COLUMNS) if self.gltr else []
        names += (["binoculars"] if self.binoculars else []) + (["lowercase"] if self.lowercase.enabled else [])
        return names

    def provides(self) -> list[str]:
        return [f"{self.model}__{n}" for n in self.score_names()]

    def build(self) -> ScoreOperator:
        return ScoreOperator(self)


def check_freq_table_tokenizer(freq_table: str, model: ModelSpec) -> None:
    """Raise ``PlanError`` unless ``freq_table`` was counted with ``model``'s tokenizer (fingerprints).

    A table without a fingerprint (made by an older version) or a tokenizer that cannot be loaded
    here (a Hub id offline) is only logged: the check needs both sides.
    """
    meta = FrequencyTable.read_metadata(freq_table)
    table_print = meta.get("tokenizer_fingerprint", "")
    if not table_print:
        log.warning("scores: %s has no tokenizer fingerprint (an older table): cannot check that it was "
                    "counted with %r's tokenizer; rebuild it with `curate freq build`", freq_table, model.name)
        return
    try:
        model_print = tokenizer_fingerprint(load_text_tokenizer(model))  # without transformers where it can
        if table_print != model_print:  # the verdict is transformers' own, as `curate freq build` counted
            model_print = tokenizer_fingerprint(load_tokenizer(model))
    except (OSError, ValueError) as err:
        log.warning("scores: cannot load %r's tokenizer to check %s: %s", model.name, freq_table, err)
        return
    if table_print != model_print:
        raise PlanError("dcpdd.freq_table", freq_table,
                        f"was counted with tokenizer {table_print} (model {meta.get('model')!r}), but lm model "
                        f"{model.name!r} ({model.path}) has tokenizer {model_print}; rebuild it with "
                        f"`curate freq build --model {model.path}`", [])


class ScoreOperator:
    """The operator: loads the FrequencyTable once per actor, maps LM columns to scores per batch."""

    def __init__(self, cfg: ScoresConfig) -> None:
        self.cfg = cfg
        self.table: FrequencyTable | None = None
        self.vocab_size = cfg.vocab_size  # else inferred once from a large enough batch, then kept
        self.encoder: TextEncoder | None = None  # the lm stage's, for zlib's span of a cut document
        if cfg.dcpdd is not None:
            self.table = FrequencyTable.load(cfg.dcpdd.freq_table)
        if cfg.zlib and cfg._lm is not None:  # with the operator, not in the run's tail at the first cut text
            lm = cfg._lm
            self.encoder = TextEncoder(load_text_tokenizer(lm.model), lm.max_tokens, lm.score_first_token)

    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.col(s), pa.float64()) for s in self.score_names()])

    def score_names(self) -> list[str]:
        return self.cfg.score_names()

    def col(self, suffix: str, model: str | None = None) -> str:
        return f"{model or self.cfg.model}__{suffix}"

    def process(self, batch: pa.Table) -> pa.Table:
        rows = self._inputs(batch)
        vocab = self._vocab(rows["rank"])
        scorers = self._scorers(vocab)
        out: dict[str, list[float | None]] = {name: [] for name in scorers}
        for i in range(batch.num_rows):
            doc = {k: v[i] for k, v in rows.items()}
            empty = doc["logprob"] is None or len(doc["logprob"]) == 0
            for name, scorer in scorers.items():
                out[name].append(None if empty else _nan_to_none(scorer(doc)))
        return pa.table({self.col(k): pa.array(v, pa.float64()) for k, v in out.items()},
                        schema=self.output_schema())

    def _vocab(self, ranks: list[np.ndarray | None]) -> int | None:
        """``vocab_size``, or V inferred from the ranks (kept once seen on ≥ 64 positions)."""
        if self.vocab_size is not None:
            check_vocab_size(ranks, self.vocab_size)
            return self.vocab_size
        vocab = infer_vocab_size(ranks)
        if vocab is not None and sum(len(r) for r in ranks if r is not None) >= _INFER_MIN_POSITIONS:
            self.vocab_size = vocab
        return vocab

    def _scorers(self, vocab: int | None) -> dict[str, Callable[[dict], float]]:
        """Score name -> function of one document's inputs (all of them non-empty)."""
        k, cfg = self.cfg.min_k, self.cfg
        scorers: dict[str, Callable[[dict], float]] = {
            "ppl": lambda d: perplexity(d["logprob"]),
            "mink": lambda d: min_k_prob(d["logprob"], k),
            "minkpp": lambda d: min_k_plus_plus(d["logprob"], d["entropy"], d["logp2"], k),
            "mean_entropy": lambda d: mean_entropy(d["entropy"]),
        }
        if cfg.allow_topk_estimates:  # the same formulas on the estimates, under their own names
            scorers["minkpp_topk"], scorers["mean_entropy_topk"] = scorers["minkpp"], scorers["mean_entropy"]
        if cfg.zlib:  # the text span the logprobs score, not the whole (maybe cut) document
            scorers["zlib"] = lambda d: zlib_ratio(d["logprob"], d["text"])
        if self.table is not None:
            table, a = self.table, cfg.dcpdd.a  # type: ignore[union-attr]
            scorers["dcpdd"] = lambda d: dcpdd_score(scored_ids(d["token_ids"], len(d["logprob"])),
                                                     d["logprob"], table, a)
        scorers["mean_log_rank"] = lambda d: mean_log_rank(d["rank"], vocab) if vocab else math.nan
        for i, name in enumerate(GLTR_COLUMNS):
            scorers[name] = lambda d, i=i: gltr_buckets(d["rank"], vocab)[i] if vocab else math.nan
        if cfg.binoculars:
            scorers["binoculars"] = lambda d: binoculars_score(d["logprob"], d["xent"])
        if cfg.lowercase.enabled:
            scorers["lowercase"] = lambda d: (lowercase_ratio(d["logprob"], d["logprob_lower"])
                                              if d["logprob_lower"] is not None else math.nan)
        return {name: scorers[name] for name in self.score_names()}

    def _inputs(self, batch: pa.Table) -> dict[str, list]:
        """Per-document inputs by role: numpy arrays (None for null lists) or texts."""
        m, cfg = self.cfg.model, self.cfg
        wanted = {"logprob": self._column(batch, "logprob"), "entropy": self._column(batch, "entropy"),
                  "logp2": self._column(batch, "logp2"), "rank": self._column(batch, "rank")}
        if cfg.dcpdd is not None:
            wanted["token_ids"] = self._column(batch, "token_ids")
        if cfg.binoculars:
            wanted["xent"] = self._column(batch, "xent", hint="configure an observer on the lm stage")
        if cfg.lowercase.enabled:
            wanted["logprob_lower"] = self._column(batch, "logprob", model=cfg.lowercase.model,
                                                   hint="add an lm stage over text_lower")
        rows = {role: ragged(batch.column(name)) for role, name in wanted.items()}
        if cfg.zlib:
            rows["text"] = self._scored_texts(batch)
        _check_aligned(rows, m)
        return rows

    def _scored_texts(self, batch: pa.Table) -> list[str | None]:
        """Per row, the text the lm stage scored: its text column, cut where the lm stage cut the
        tokens (``M__truncated``) to the span of the kept tokens (``TextEncoder.scored_text``)."""
        column = self.cfg.text_column
        if column not in batch.column_names:
            raise KeyError(f"column {column!r} not found: zlib compresses the text the lm stage for "
                           f"{self.cfg.model!r} scored (its text_column)")
        texts = batch.column(column).to_pylist()
        cut = batch.column(self._column(batch, "truncated")).to_pylist()
        return [self._span(text, row) if flag else text for row, (text, flag) in enumerate(zip(texts, cut, strict=True))]

    def _span(self, text: str, row: int) -> str:
        if self.encoder is None:  # built with the operator whenever an lm stage is bound
            raise ValueError(f"{self.cfg.model}__truncated is true in row {row}: zlib needs the span the "
                             "lm stage scored, from that stage's tokenizer; bind the scores stage to its "
                             "lm stage (a pipeline config does; by hand: ScoresConfig.bind([lm_config]))")
        return self.encoder.scored_text(text)

    def _column(self, batch: pa.Table, metric: str, model: str | None = None, hint: str = "") -> str:
        """The column holding ``metric`` (or its vLLM estimate); a clear error naming what is missing."""
        if metric in _ESTIMATES and model is None:
            exact, estimate = self.col(metric), self.col(_ESTIMATES[metric])
            if self.cfg.allow_topk_estimates:
                if estimate in batch.column_names:
                    return estimate
                raise KeyError(f"column {estimate!r} not found: allow_topk_estimates: true reads the vLLM "
                               f"top-k estimates; for exact metrics ({exact!r}) set it false")
            if exact in batch.column_names:
                return exact
            if estimate in batch.column_names:
                raise KeyError(f"column {exact!r} not found, only the top-k estimate {estimate!r}: Min-K%++ "
                               "from estimates is a different number; set allow_topk_estimates: true to "
                               "write it as M__minkpp_topk, or use exact metrics (vllm.mode: exact or backend: torch)")
        for name in (self.col(metric, model),):
            if name in batch.column_names:
                return name
        lm = [c.split("__")[0] for c in batch.column_names if "__" in c and not c.startswith("__")]
        raise KeyError(f"column {self.col(metric, model)!r} not found: the lm stage for model "
                       f"{model or self.cfg.model!r} must compute {metric!r}"
                       f"{f' ({hint})' if hint else ''}; lm columns here are for {sorted(set(lm))}")


def scored_ids(token_ids: np.ndarray, n_scored: int) -> np.ndarray:
    """x_1 … x_n: the ids the n logprobs score (``token_ids`` holds x_0 … x_n, BOS first)."""
    if token_ids is None or len(token_ids) != n_scored + 1:
        got = None if token_ids is None else len(token_ids)
        raise ValueError(f"token_ids ({got}) must hold one id more than logprob ({n_scored})")
    return token_ids[1:]


def infer_vocab_size(ranks: list[np.ndarray | None]) -> int | None:
    """V from the engine's rank fractions c/V (c ≥ 1 integer), when the batch's smallest is 1/V.

    A top-1 prediction (c = 1) occurs in practically every batch; the guess V = round(1/min) is
    kept only if every rank·V is an integer (else a c = 2 minimum, say, would halve V) and
    raises otherwise, asking for ``vocab_size``. None when the batch has no ranks.
    """
    values = [r for r in ranks if r is not None and len(r)]
    if not values:
        return None
    vocab = round(1.0 / float(np.concatenate(values).min()))
    if vocab < 2:
        raise ValueError("cannot infer the vocabulary size from the rank column; set scores.vocab_size")
    check_vocab_size(values, vocab)
    return vocab


def check_vocab_size(ranks: list[np.ndarray | None], vocab: int) -> None:
    """Every rank fraction must be c/V for an integer c in [1, V]; ValueError otherwise."""
    values = [r for r in ranks if r is not None and len(r)]
    if not values:
        return
    scaled = np.concatenate(values).astype(np.float64) * vocab
    if np.abs(scaled - np.rint(scaled)).max() > _RANK_TOLERANCE or scaled.min() < 0.5 or scaled.max() > vocab + 0.5:
        raise ValueError(f"rank fractions are not multiples of 1/{vocab}: set scores.vocab_size to "
                         "the model's logits width")


def _check_aligned(rows: dict[str, list], model: str) -> None:
    lengths = {role: [None if r is None else len(r) for r in values] for role, values in rows.items()
               if role not in ("text", "token_ids", "logprob_lower")}
    ref = lengths.pop("logprob")
    for role, got in lengths.items():
        extra = 1 if role == "xent" else 0  # xent: every position, the last token's included
        bad = [i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a and b is not None and a + extra != b]
        if bad:
            raise ValueError(f"{model}__{role} and {model}__logprob differ in length (row {bad[0]}"
                             f"{'; xent has one row more' if extra else ''})")


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)
