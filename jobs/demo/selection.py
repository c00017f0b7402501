"""The demo selection task: a pool with a known target class, and the target examples SAE selection aims at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DEMO_HARD_NEGATIVE_LANGS = ("deu_Latn", "fra_Latn", "ita_Latn", "spa_Latn")
DEMO_N_TARGET = 8
DEMO_N_HUMAN = 180
DEMO_N_MACHINE = 60


# ---------------------------------------------------------------------------------------------
# The demo pool
# ---------------------------------------------------------------------------------------------


def demo_pool_tables(corpus: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(pool, target) from the demo corpus (see the module docstring); deterministic."""
    rows = corpus.to_pylist()
    english = sorted((r for r in rows if r["source"] == "parallel" and r["lang"] == "eng_Latn"),
                     key=lambda r: r["id"])
    target, positives = english[:DEMO_N_TARGET], english[DEMO_N_TARGET:]
    positive_ids = {r["id"] for r in positives}
    translations = sorted((r for r in rows if r["source"] == "parallel" and r["id"] in positive_ids
                           and r["lang"] in DEMO_HARD_NEGATIVE_LANGS), key=lambda r: (r["lang"], r["id"]))

    def first(source: str, count: int) -> list[dict]:
        return sorted((r for r in rows if r["source"] == source), key=lambda r: r["id"])[:count]

    negatives = translations + first("python-docs", DEMO_N_HUMAN) + first("smollm2-generated", DEMO_N_MACHINE)
    pool = [{**r, "id": f"{r['id']}-{r['lang']}", "label": 1} for r in positives]
    pool += [{**r, "id": f"{r['id']}-{r['lang']}", "label": 0} for r in negatives]
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                        ("lang", pa.string()), ("label", pa.int8())])
    return (pa.Table.from_pylist(sorted(pool, key=lambda r: r["id"]), schema=schema),
            pa.Table.from_pylist(target, schema=schema))


def build_demo_selection_pool(cache: Path | None = None, log: Any = print) -> tuple[Path, Path]:
    """Write ``<cache>/demo/selection/{pool,target}.parquet`` from the demo corpus; return their paths."""
    from jobs.demo.cache import demo_dir
    from jobs.demo.corpus import prepare_demo_corpus

    corpus_dir = prepare_demo_corpus(cache, log)
    corpus = pa.concat_tables(pq.read_table(p) for p in sorted(corpus_dir.glob("*.parquet")))
    pool, target = demo_pool_tables(corpus)
    out = demo_dir(cache) / "selection"
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "pool.parquet", out / "target.parquet"
    for table, path in zip((pool, target), paths, strict=True):
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
    log(f"demo selection pool: {pool.num_rows} rows ({sum(pool.column('label').to_pylist())} positives) "
        f"at {paths[0]}; target {target.num_rows} rows at {paths[1]}")
    return paths


def demo_eval_selection(skip_first: int = 0, max_tokens: int = 256, n: float = 0.05) -> Any:
    """``curate eval-selection``'s evaluation on the demo task: the demo pool and target, the demo
    model and its layer-15 SAE (each built once, cached); a ``SelectionEval``."""
    from jobs.demo.constants import DEMO_LAYER
    from jobs.demo.model import prepare_demo_model
    from jobs.demo.sae import prepare_demo_sae
    from jobs.eval.selection import evaluate_selection

    pool, target = build_demo_selection_pool()
    return evaluate_selection(pq.read_table(pool), pq.read_table(target), prepare_demo_model(), prepare_demo_sae(),
                              DEMO_LAYER, n=n, max_tokens=max_tokens, skip_first=skip_first)
