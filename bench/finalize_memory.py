"""Driver peak RSS of the whole-run finalizers as the number of staged rows grows (issue 21).

A run's ``documents`` are staged as Parquet files with their writers' reports (``StagedFile``):
a parallel corpus in four languages with token counts, ``n_chars`` and a PreSelect score, short
texts, 20,000 rows a file. Then, in a fresh driver process per (rows, mode), the two finalizers
that read every row run and stage their tables:

* token premium (``TokenCountsConfig.finalize``) and a top-10%-of-characters selection;
* ``mode = driver``: the in-memory reference functions, as the finalizers ran before issue 21
  (``scan_documents`` → ``first_per_id_lang`` + ``premium_table``; ``select_documents``; the
  driver writes ``selected``);
* ``mode = ray``: the Ray aggregations (``premium_sums``; ``select_run``: a distributed sort,
  workers write ``selected``).

Reported per run: the driver's peak RSS (``ru_maxrss``) after ``ray.init`` and the imports
(``baseline_mb``) and at the end (``peak_mb``), their difference (``finalize_mb``) and seconds.

    python -m bench.finalize_memory                               # 1e5 and 1e6 rows, both modes
    python -m bench.finalize_memory --rows 100000 3000000 --modes ray
Writes bench/results/finalize_memory.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import ROOT, save

LANGS = ["eng_Latn", "fra_Latn", "deu_Latn", "swh_Latn"]
ROWS_PER_FILE = 20_000


def stage_documents(output_dir: Path, rows: int, seed: int = 0) -> list:
    """Stage ``rows`` generated documents as this run's ``documents`` files; their reports."""
    from pipelines.staging import stage_rows
    from pipelines.tables import open_output

    output = open_output(str(output_dir))
    rng = np.random.default_rng(seed)
    staged = []
    for file_no, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        i = np.arange(start, start + n)
        texts = [f"document {k} " * (1 + k % 7) for k in i.tolist()]
        n_chars = np.array([len(t) for t in texts], np.int64)
        staged.append(stage_rows(output, "documents", "2026-01-01", "bench", f"part-{file_no:05d}", pa.table({
            "id": [f"p{k // len(LANGS):09d}" for k in i.tolist()],  # each id in the four languages
            "lang": [LANGS[k % len(LANGS)] for k in i.tolist()],
            "text": texts, "source_file": [f"shard-{file_no}.parquet"] * n,
            "source_row": pa.array(i - start, pa.int64()),
            "n_bytes": n_chars, "n_chars": n_chars,
            "tokens__t": rng.integers(1, 40, n), "fallback_chars__t": rng.integers(0, 3, n),
            "unk_chars__t": rng.integers(0, 2, n), "preselect_score": rng.random(n),
        })))
    return staged


DRIVER = """
import json, pickle, resource, sys, tempfile, time
from pathlib import Path
import ray

from operators.selection import TopFractionCharsPolicy, select_documents, select_run
from operators.token_premium.math import first_per_id_lang, premium_table
from operators.token_premium.stage import TokenCountsConfig
from pipelines.finalize import FinalizeContext
from pipelines.tables import RunLayout, open_output

mode, output_dir, staged_file = sys.argv[1:4]
ray.init(num_cpus=2, object_store_memory=2 << 30, include_dashboard=False, log_to_driver=False)
staged = pickle.loads(Path(staged_file).read_bytes())
ctx = FinalizeContext(RunLayout(open_output(output_dir), "2026-01-01", "bench"), Path(tempfile.mkdtemp()), staged)
stage = TokenCountsConfig.model_validate({"op": "token_premium", "tokenizers": [
    {"name": "t", "kind": "tiktoken", "encoding": "cl100k_base"}]})
policy = TopFractionCharsPolicy(fraction=0.1)
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
baseline, t = rss_mb(), time.perf_counter()
if mode == "driver":
    deduped, _ = first_per_id_lang(ctx.scan_documents())
    premium = premium_table(deduped, ["t"], "eng_Latn", 0.10)
    selected = select_documents(ctx.scan_documents(), "preselect_score", "preselect", policy)
else:
    premium = stage.finalize(ctx)["token_premium"]
    selected = select_run(ctx, "preselect_score", "preselect", policy)
written = ctx.stage("token_premium", premium, "part-premium") + ctx.stage("selected", selected, "part-sel")
print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - t, 1), "baseline_mb": round(baseline),
                  "peak_mb": round(rss_mb()), "finalize_mb": round(rss_mb() - baseline),
                  "premium_rows": premium.num_rows, "selected_rows": sum(f.rows for f in written if f.table == "selected")}))
"""


def run_driver(mode: str, output_dir: Path, staged_file: Path) -> dict:
    """One finalize in a fresh driver process: its JSON line."""
    out = subprocess.run([sys.executable, "-c", DRIVER, mode, str(output_dir), str(staged_file)],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"mode"')]
    if out.returncode or not lines:
        raise RuntimeError(f"{mode} driver failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--modes", nargs="+", choices=["driver", "ray"], default=["driver", "ray"])
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="finalize-bench-") as tmp:
            staged = stage_documents(Path(tmp) / "out", rows)
            staged_file = Path(tmp) / "staged.pkl"
            staged_file.write_bytes(pickle.dumps(staged))
            for mode in args.modes:
                result = {"rows": rows, **run_driver(mode, Path(tmp) / "out", staged_file)}
                print(json.dumps(result), flush=True)
                results.append(result)
    by = {(r["mode"], r["rows"]): r["finalize_mb"] for r in results}
    lo, hi = min(args.rows), max(args.rows)
    ratios = {m: round(max(by[(m, hi)], 1) / max(by[(m, lo)], 1), 2) for m in args.modes if lo != hi}
    save("finalize_memory", {"rows_per_file": ROWS_PER_FILE, "runs": results,
                             f"finalize_mb_ratio_{hi}_vs_{lo}": ratios})


if __name__ == "__main__":
    main()
