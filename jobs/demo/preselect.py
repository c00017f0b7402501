"""The offline PreSelect demo: a model family cut from the demo model, labels, a fastText scorer.

``python -m jobs.demo.preselect`` prepares, under ``<cache>/demo/``:

* ``family/<name>/``: the demo model's first k transformer blocks (+ final norm and the tied
  LM head) for each k in ``DEMO_LAYERS``; k = 30 is the demo model itself (its dir is reused);
* ``family/family.yaml``: those models with a benchmark score measured here: top-1 next-token
  accuracy on the held-out human docs (``is_heldout``), micro-averaged over scored tokens,

      acc_i = Σ_d Σ_j 1[log p_i(x_{j+1} | x_≤j) = max_v log p_i(v | x_≤j)] / Σ_d n_scored(d)

  (the ``lm`` stage's ``logprob == max_logprob``: u_t = 0 exactly at the arg-max);
* ``preselect/``: ``labels.parquet`` (the other human docs, labelled by predictive strength as
  ``curate preselect label`` does), ``model.bin`` (``curate preselect train``) and ``train.json``.

The members' losses come from the shared demo lm pass (``jobs.demo.lmpass``): one pass of the full
model, member k read off its layer-k hidden states (``lm_head(norm(h_k))`` is what the cut
checkpoint computes), all documents cut to ``FAMILY_TOKENS`` tokens. The members share one
tokenizer, so their losses cover the same span and no document is skipped as truncated.

Every step is cached: a finished directory holds a marker written last and is moved into place
atomically (the helpers of ``jobs.demo``), so a rerun does no work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import yaml

from jobs.demo.cache import Log, atomic_dir, demo_dir, is_complete, locked
from jobs.demo.constants import DEMO_LAYERS, FAMILY_TOKENS, member_name
from jobs.demo.corpus import human_docs, prepare_demo_corpus
from jobs.demo.lmpass import prepare_demo_lmpass
from jobs.demo.model import prepare_demo_model
from jobs.train.preselect import Family, train_from_labels, write_labels

#: Human docs not held out that get labelled (of ~190).
DEMO_LABEL_DOCS = 160
#: 2: members scored by the shared lm pass (early exit), 128-token windows, no context token.
FAMILY_VERSION = 2
PRESELECT_VERSION = 2
#: ``curate preselect train`` defaults; a larger held-out share, since the demo labels ~80 docs.
DEMO_TRAIN = {"valid_fraction": 0.2}
FAMILY_FILE = "family.yaml"
_NOT_WEIGHTS = {"config.json", "model.safetensors", ".complete.json"}


def is_heldout(doc_id: str) -> bool:
    """The benchmark's held-out split of the demo corpus: sha1-hex ids with int(id[:8]) % 5 == 0."""
    return int(doc_id[:8], 16) % 5 == 0


# ---------------------------------------------------------------------------- family members


def save_truncated(model_dir: Path, layers: int, out: Path) -> None:
    """Keep the first ``layers`` decoder blocks (plus final norm and LM head); save to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"layers must be in [1, {total}], got {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    for extra in model_dir.iterdir():  # tokenizer files, chat template
        if extra.is_file() and extra.name not in _NOT_WEIGHTS and not (out / extra.name).exists():
            shutil.copy2(extra, out / extra.name)


def prepare_member(demo: Path, model_dir: Path, layers: int, log: Log) -> Path:
    """The cached variant with ``layers`` blocks (the demo model's own dir for all of them)."""
    import json as _json

    total = _json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    if layers == total:
        return model_dir
    out = demo / "family" / member_name(layers)
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out.parent, out.name):
        if not is_complete(out):
            log(f"preselect family: saving the first {layers} of {total} blocks -> {out}")
            with atomic_dir(out, {"source": str(model_dir), "layers": layers}) as tmp:
                save_truncated(model_dir, layers, tmp)
    return out


# ------------------------------------------------------------------------- the benchmark


def check_increasing(scores: dict[str, float], layers: dict[str, int]) -> None:
    """Raise unless the benchmark score strictly increases with the number of blocks."""
    ordered = sorted(scores, key=lambda n: layers[n])
    values = [scores[n] for n in ordered]
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        shown = ", ".join(f"{n} ({layers[n]} blocks): {scores[n]:.4f}" for n in ordered)
        raise RuntimeError(f"benchmark scores do not increase with depth: {shown}")


def family_losses(cache: Path | None, log: Log) -> pl.DataFrame:
    """Per human doc (id, scored_text): each member's nll_sum, hits and tokens (the shared lm pass)."""

    return pl.read_parquet(prepare_demo_lmpass(cache, log) / "family.parquet")


def next_token_accuracy(losses: pl.DataFrame, names: list[str]) -> dict[str, dict[str, float]]:
    """acc = Σ hits / Σ scored positions, per member, over the documents of ``losses``."""
    out = {}
    for n in names:
        hits, tokens = int(losses[f"{n}__hits"].sum()), int(losses[f"{n}__tokens"].sum())
        out[n] = {"accuracy": hits / tokens if tokens else float("nan"), "tokens": tokens}
    return out


def family_is_current(path: Path) -> bool:
    """``family.yaml`` exists and was measured the way this version measures it."""
    if not path.is_file():
        return False
    return (yaml.safe_load(path.read_text()) or {}).get("benchmark", {}).get("version") == FAMILY_VERSION


def prepare_demo_family(cache: Path | None = None, log: Log = print) -> Path:
    """Build (or reuse) the demo family and its measured ``family.yaml``; return its path."""
    demo = demo_dir(cache)
    path = demo / "family" / FAMILY_FILE
    if family_is_current(path):
        log(f"preselect family: cached at {path}")
        return path
    model_dir = prepare_demo_model(cache, log)
    (demo / "family").mkdir(exist_ok=True)
    with locked(demo / "family", FAMILY_FILE):
        if family_is_current(path):
            return path
        members = {member_name(k): (prepare_member(demo, model_dir, k, log), k) for k in DEMO_LAYERS}
        losses = family_losses(cache, log)
        heldout = losses.filter(pl.col("id").map_elements(is_heldout, return_dtype=pl.Boolean))
        measured = next_token_accuracy(heldout, list(members))
        scores = {n: m["accuracy"] for n, m in measured.items()}
        log("preselect family: next-token accuracy " + ", ".join(f"{n} {s:.4f}" for n, s in scores.items()))
        check_increasing(scores, {n: k for n, (_, k) in members.items()})
        family = {
            "benchmark": {"metric": "next_token_accuracy", "split": "demo human docs, int(id[:8], 16) % 5 == 0",
                          "docs": heldout.height, "max_tokens": FAMILY_TOKENS, "version": FAMILY_VERSION,
                          "scored_by": "jobs.demo.lmpass (one pass of the full model, early exit per member)",
                          "tokens": {n: m["tokens"] for n, m in measured.items()}},
            "models": [{"name": n, "path": str(p), "backend": "torch", "bench_score": round(scores[n], 6),
                        "layers": k} for n, (p, k) in members.items()],
        }
        Family.model_validate(family)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(family, sort_keys=False))
        tmp.replace(path)
    log(f"preselect family: wrote {path}")
    return path


# ------------------------------------------------------------------- labels and the scorer


def prepare_demo_preselect(cache: Path | None = None, log: Log = print) -> Path:
    """Build (or reuse) the demo PreSelect scorer ``<cache>/demo/preselect/model.bin``: the first
    ``DEMO_LABEL_DOCS`` human docs not held out, labelled by predictive strength over the family."""
    demo = demo_dir(cache)
    out = demo / "preselect"
    if is_complete(out, PRESELECT_VERSION):
        log(f"preselect demo: cached at {out / 'model.bin'}")
        return out / "model.bin"
    family_path = prepare_demo_family(cache, log)
    with locked(demo, "preselect"):
        if is_complete(out, PRESELECT_VERSION):
            return out / "model.bin"
        family = Family.model_validate(yaml.safe_load(family_path.read_text()))
        docs, scored = label_pool(prepare_demo_corpus(cache, log), family_losses(cache, log), family)
        meta = {"asset_version": PRESELECT_VERSION, "family": str(family_path), "docs": docs.num_rows}
        with atomic_dir(out, meta) as tmp:
            log(f"preselect demo: labelling {docs.num_rows} human docs (max {FAMILY_TOKENS} tokens)")
            write_labels(family, docs, scored, str(tmp / "labels.parquet"), max_tokens=FAMILY_TOKENS, log=log)
            report = train_from_labels(str(tmp / "labels.parquet"), str(tmp / "model.bin"), **DEMO_TRAIN)
            report_json = {**report.__dict__, "model_path": str(out / "model.bin")}
            (tmp / "train.json").write_text(json.dumps(report_json, indent=2) + "\n")
            log(f"preselect demo: held-out precision {report.precision:.3f}, recall {report.recall:.3f}")
    log(f"preselect demo: ready at {out / 'model.bin'}")
    return out / "model.bin"


def label_pool(corpus: Path, losses: pl.DataFrame, family: Family) -> tuple[pa.Table, pl.DataFrame]:
    """The docs to label (id, text, scored_text) and their members' losses (``label_frame`` input).

    ``<member>__truncated`` is False throughout: every member scored the same ``max_tokens`` ids."""
    docs = human_docs(corpus)
    pool = docs.filter(pa.array([not is_heldout(i) for i in docs.column("id").to_pylist()])).slice(0, DEMO_LABEL_DOCS)
    pool_losses = pl.DataFrame({"id": pool.column("id").to_pylist()}).join(losses, on="id", how="left")
    pool = pool.append_column("scored_text", pool_losses["scored_text"].to_arrow())
    scored = pool_losses.select("id", *[pl.col(f"{m.name}__nll_sum") for m in family.models],
                                *[pl.lit(False).alias(f"{m.name}__truncated") for m in family.models])
    return pool, scored


def main() -> None:
    """``python -m jobs.demo.preselect``: family, labels and the scorer, saying what is done."""
    path = prepare_demo_preselect()
    print(f"preselect demo ready: {path}")


if __name__ == "__main__":
    main()
