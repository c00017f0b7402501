"""One pass of the demo model over the demo corpus, shared by the PAWN, SAE and PreSelect builds.

The three builds read the same model on the same documents; scoring each document once, with every
layer they need tapped, replaces three engine runs (and the PreSelect family's four models) by one:

* ``pawn.parquet``: the PAWN documents (``jobs.demo.corpus.demo_documents``) with the ``lm`` stage's
  columns (metrics, ``hidden_last``) and the ``scores`` stage's, as the pipeline writes them;
* ``sae.npy``: layer-15 activations [N, H] for the SAE, exactly those ``train_sae`` collects
  (texts in its shuffled order, positions ``skip_first`` … ``max_tokens - 1``, up to ``max_rows``:
  a causal model's states of the first 128 tokens do not depend on the tokens after them);
* ``family.parquet``: per human doc, the loss and next-token hits of every PreSelect family member.
  Member k (the first k blocks + final norm + LM head) is read off the full model: its logits are
  ``lm_head(norm(hidden_states[k]))``, the very computation of the cut checkpoint (early exit).

The PAWN documents are cut to ``DEMO_MAX_TOKENS`` (256) tokens, with no context token added
(``score_first_token`` off, as in ``pipelines/nightly.yaml``); the others to ``SHORT_TOKENS`` (128),
all that the SAE and the family read (the family reads the first 128 tokens of every document). The
members share one tokenizer, so every member's loss covers the same span.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.demo.assets import build_demo_asset
from jobs.demo.cache import Log
from jobs.demo.constants import DEMO_LAYERS, DEMO_MAX_TOKENS, DEMO_MODEL, DEMO_SAE, FAMILY_TOKENS, member_name
from jobs.demo.corpus import demo_documents, human_docs
from jobs.train.sae import shuffled_texts

#: 2: documents PAWN does not read cut to 128 tokens (the family reads 128; version 1: 256).
ASSET_VERSION = 2
#: Tokens kept of the documents PAWN does not read.
SHORT_TOKENS = max(FAMILY_TOKENS, DEMO_SAE.max_tokens)
#: Texts per engine call (the engine packs them into forward passes of ≤ 8192 padded tokens).
BATCH_ROWS = 16


def prepare_demo_lmpass(cache: Path | None = None, log: Log = print) -> Path:
    """``<cache>/demo/lmpass/``: the pass's three files (module docstring), built once."""
    def build(tmp: Path, model_dir: Path, corpus: Path) -> dict:
        start = time.perf_counter()
        counts = run_pass(model_dir, corpus, tmp, log)
        seconds = round(time.perf_counter() - start, 1)
        log(f"demo lm pass: {counts} in {seconds} s")
        return {**counts, "seconds": seconds, "max_tokens": DEMO_MAX_TOKENS, "short_tokens": SHORT_TOKENS}

    return build_demo_asset("lmpass", build, cache, log, ASSET_VERSION)


def run_pass(model_dir: Path, corpus: Path, out: Path, log: Log) -> dict[str, int]:
    """Score the corpus once and write ``pawn.parquet``, ``sae.npy`` and ``family.parquet`` to ``out``."""
    from operators.lm.stage import LMStageConfig

    pawn_docs, humans = demo_documents(corpus), human_docs(corpus)
    op = LMStageConfig(model={"name": DEMO_MODEL, "path": str(model_dir)}, max_tokens=DEMO_MAX_TOKENS,
                       cache_hidden=["last"], taps=[*DEMO_LAYERS, DEMO_SAE.layer]).build()
    keeper = Keeper(op.engine, model_dir, pawn=pawn_docs.column("text").to_pylist(),
                    family=humans.column("text").to_pylist())
    texts = shuffled_texts(str(corpus), DEMO_SAE)  # the SAE's order; then what it does not reach
    seen = set(texts)
    texts += [t for t in dict.fromkeys([*keeper.pawn_texts, *keeper.family.texts]) if t not in seen]
    log(f"demo lm pass: {DEMO_MODEL} over up to {len(texts)} texts ({DEMO_MAX_TOKENS} tokens for PAWN, else "
        f"{SHORT_TOKENS}; layers "
        f"{keeper.family.layers} for the PreSelect family, {DEMO_SAE.layer} for the SAE, last for PAWN)")
    start = time.perf_counter()
    for first in range(0, len(texts), BATCH_ROWS):
        chunk = [t for t in texts[first: first + BATCH_ROWS] if keeper.wants(t)]
        docs = [d if t in keeper.pawn_texts else cut(d, SHORT_TOKENS) for t, d in zip(chunk, op.engine.encode(chunk),
                                                                                      strict=True)]
        for text, doc, res in zip(chunk, docs, op.engine.score(docs, op.heads, keeper.cache_layers), strict=True):
            keeper.keep(text, doc, res)
        done = min(first + BATCH_ROWS, len(texts))
        if done % (8 * BATCH_ROWS) == 0 or done == len(texts):
            log(f"demo lm pass: {done}/{len(texts)} texts ({time.perf_counter() - start:.0f} s)")
    pawn = pawn_table(pawn_docs, op, keeper.pawn)
    pq.write_table(pawn, out / "pawn.parquet")
    acts = np.concatenate(keeper.sae)[: DEMO_SAE.max_rows]
    np.save(out / "sae.npy", acts)
    rows = [{"id": i, **keeper.family.rows[t]} for i, t in zip(humans.column("id").to_pylist(),
                                                               humans.column("text").to_pylist(), strict=True)]
    pq.write_table(pa.Table.from_pylist(rows), out / "family.parquet")
    return {"texts": len(texts), "pawn_docs": pawn.num_rows, "sae_rows": len(acts), "sae_texts": keeper.sae_texts,
            "family_docs": len(rows)}


def cut(doc: Any, tokens: int) -> Any:
    """``doc`` (an ``Encoded``) cut to its first ``tokens`` ids."""
    if doc.ids is None or len(doc.ids) <= tokens:
        return doc
    return replace(doc, ids=doc.ids[:tokens], truncated=True)


class Keeper:
    """Files each scored document under the consumers that want it, keeping only what they read."""

    def __init__(self, engine: Any, model_dir: Path, pawn: list[str], family: list[str]) -> None:
        self.pawn_texts = set(pawn)
        self.family = FamilyReader(engine, model_dir, family)
        self.sae_layer, self.last = engine.resolve_layer(DEMO_SAE.layer), engine.resolve_layer("last")
        self.cache_layers = self.family.cache_layers | {self.sae_layer, self.last}
        self.pawn: dict[str, tuple[Any, Any]] = {}  # text -> (Encoded, DocResult with hidden_last only)
        self.sae: list[np.ndarray] = []  # [n_i, H] blocks, in the SAE's order
        self.sae_rows = self.sae_texts = 0

    def wants(self, text: str) -> bool:
        return self.sae_rows < DEMO_SAE.max_rows or text in self.pawn_texts or text in self.family.texts

    def keep(self, text: str, doc: Any, res: Any) -> None:
        if res is None:  # skipped by the engine (empty, or one token)
            return
        if self.sae_rows < DEMO_SAE.max_rows:
            states = res.hidden[self.sae_layer][DEMO_SAE.skip_first: DEMO_SAE.max_tokens]
            self.sae.append(states[: DEMO_SAE.max_rows - self.sae_rows])
            self.sae_rows += len(self.sae[-1])
            self.sae_texts += 1
        if text in self.family.texts:
            self.family.read(text, doc, res)
        if text in self.pawn_texts:
            res.hidden = {self.last: res.hidden[self.last]}  # what to_table writes (hidden_last)
            self.pawn[text] = (doc, res)


def pawn_table(docs: pa.Table, op: Any, scored: dict[str, tuple[Any, Any]]) -> pa.Table:
    """``docs`` (id, text, label) with the ``lm`` and ``scores`` stages' columns, in ``docs`` order."""
    from operators.scores import ScoresConfig

    pairs = [scored[t] for t in docs.column("text").to_pylist()]
    table = _append(docs, op.to_table([d for d, _ in pairs], [r for _, r in pairs]))
    return _append(table, ScoresConfig(model=DEMO_MODEL, zlib=False).build().process(table))


def _append(table: pa.Table, cols: pa.Table) -> pa.Table:
    for name in cols.column_names:
        table = table.append_column(cols.field(name), cols.column(name))
    return table


class EarlyExit:
    """The demo model's own final norm and LM head: ``exit(h_k)`` = lm_head(norm(h_k)) [N,V] are
    the logits of the model cut after block k (what a checkpoint keeping the first k blocks
    computes), from the tapped hidden states h_k [N,H]. Loaded on CPU, apart from the engine."""

    def __init__(self, model_dir: Path) -> None:
        from operators.lm.models import ModelSpec, load_causal_lm, load_tokenizer
        from operators.lm.shared import LMHead

        spec = ModelSpec(name=DEMO_MODEL, path=str(model_dir))
        model = load_causal_lm(spec, "cpu")
        self.norm, self.head = model.base_model.norm, LMHead.of(model)  # the rest of the model is freed
        self.tokenizer = load_tokenizer(spec)

    def __call__(self, hidden: Any) -> Any:
        return self.head(self.norm(hidden))


class FamilyReader:
    """Losses of the PreSelect family's members from one scored document of the full model."""

    def __init__(self, engine: Any, model_dir: Path, texts: list[str]) -> None:
        self.texts = set(texts)
        self.exit = EarlyExit(model_dir)
        self.full = engine.model_info().num_layers
        self.layers = [k for k in DEMO_LAYERS if k != self.full]
        self.cache_layers = {engine.resolve_layer(k) for k in self.layers}
        self.rows: dict[str, dict[str, Any]] = {}

    def read(self, text: str, doc: Any, res: Any) -> None:
        """Row of ``text`` over its first ``FAMILY_TOKENS`` ids: ``<member>__nll_sum``, ``__hits``
        (arg-max next tokens), ``__tokens`` (scored positions), and ``scored_text`` (the text those
        ids cover)."""
        import torch

        from operators.lm.metrics import nll_sum, token_metrics

        ids = doc.ids[:FAMILY_TOKENS]
        rows = len(ids) - 1  # scored positions
        targets = torch.tensor(ids[1:])
        per_member = {self.full: (res.metrics["logprob"][:rows], res.metrics["max_logprob"][:rows])}
        with torch.inference_mode():
            for k in self.layers:
                logits = self.exit(torch.from_numpy(res.hidden[k][:rows]))
                m = token_metrics(logits, targets, ("max_logprob",))
                per_member[k] = (m["logprob"].numpy(), m["max_logprob"].numpy())
        cut_here = doc.truncated or len(doc.ids) > len(ids)
        scored_text = self.exit.tokenizer.decode(ids, skip_special_tokens=True) if cut_here else text
        row: dict[str, Any] = {"scored_text": scored_text}
        for k, (logprob, max_logprob) in per_member.items():
            name = member_name(k)
            row[f"{name}__nll_sum"] = nll_sum(logprob)
            row[f"{name}__hits"] = int((logprob == max_logprob).sum())
            row[f"{name}__tokens"] = int(logprob.size)
        self.rows[text] = row
