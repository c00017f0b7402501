"""Run every benchmark at small sizes, then rewrite the tables of bench/README.md (``make bench``).

    python -m bench.run_all [--only soak one_pass ...] [--table-only] [--timeout 900]

Each benchmark runs as its own ``python -m bench.<name> ...`` subprocess, so one failure is reported
and the others still run; each writes ``bench/results/<result>.json``. The table between
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` in bench/README.md is then rebuilt from
the JSON files there (one row per measured ratio; a benchmark that failed this time keeps its last
figures, marked as such). The membership and detection testbeds are not ratios: their AUROC tables
(mean ± sd over seeds) go between their own markers, ``<!-- <result>:start -->`` /
``<!-- <result>:end -->`` (``TESTBEDS``). Exits non-zero if any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS, ROOT

README = ROOT / "bench" / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


@dataclass(frozen=True)
class Bench:
    """A benchmark module, the arguments run_all gives it, and the result file it writes."""

    module: str
    args: tuple[str, ...]
    result: str


BENCHES = [
    Bench("soak", ("--docs", "4000", "--scales", "1", "4", "16"), "soak"),
    Bench("pipeline", ("--scale-docs", "4000", "--scales", "1", "4", "16"), "pipeline_nightly"),
    Bench("tokenizer_stage", ("--docs", "4000", "--repeats", "2"), "tokenizer_stage"),
    Bench("preselect_fasttext", ("--docs", "200000", "--repeats", "3"),
          "preselect_fasttext"),
    Bench("lm_engine", ("--docs", "60", "--repeats", "2"), "lm_engine_cpu"),
    Bench("one_pass", ("--docs", "48", "--repeats", "1"), "one_pass"),
    Bench("membership_testbed", (), "membership_testbed"),
    Bench("detection_testbed", (), "detection_testbed"),
]

Row = tuple[str, str, float, str]  # benchmark, what is compared, ratio, absolute numbers


def _n(x: float) -> str:
    """A number for the table: thousands separated, at most 3 significant decimals below 10."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def soak_rows(r: dict) -> list[Row]:
    base, top = r["runs"][0], r["runs"][-1]
    scale = f"{top['docs'] // base['docs']}× vs 1× ({_n(top['docs'])} vs {_n(base['docs'])} synthetic docs)"
    bench = "soak (token_premium cl100k, 2 actors)"
    return [(bench, f"driver peak RSS, {scale}", r["rss_ratio_largest_vs_1x"],
             f"{_n(top['driver_peak_rss_mb'])} vs {_n(base['driver_peak_rss_mb'])} MB"),
            _marginal_row(bench, r)]


def _marginal_row(bench: str, r: dict) -> Row:
    """Linearity: seconds per extra doc at the largest scales over that at the smallest."""
    runs, ms = r["runs"], r["marginal_ms_per_doc"]
    return (bench, f"marginal seconds per doc, {runs[-2]['docs'] // runs[0]['docs']}×→"
                   f"{runs[-1]['docs'] // runs[0]['docs']}× vs 1×→{runs[1]['docs'] // runs[0]['docs']}× "
                   "(fixed start-up excluded; 1.0 = linear)",
            r["marginal_seconds_per_doc_ratio"],
            f"{ms['largest']:.3g} vs {ms['smallest']:.3g} ms/doc; whole runs "
            + ", ".join(f"{_n(x['docs'])} docs {_n(x['seconds'])} s" for x in runs))


def pipeline_rows(r: dict) -> list[Row]:
    n = r["nightly"]
    split = ", ".join(f"{st['name']} {_n(st['seconds'])}" for st in n["stages"] if st["name"] != "read")
    rate, mem = n["lm_tokens_per_s"], n["lm_actor_memory"]
    rows = [("pipeline (nightly.yaml)", f"lm stage tokens/s in the pipeline vs its engine alone, {n['docs']} demo docs",
             n["lm_in_pipeline_vs_engine"],
             f"{n['lm_in_pipeline_vs_engine']:.3f}, target ≥ 0.9: {_n(rate['in_stage'])} vs "
             f"{_n(rate['engine_alone'])} tokens/s ({_n(n['lm_tokens'])} tokens, "
             f"{_n(n['lm_stage_seconds'])} vs {_n(n['engine_alone_seconds'])} s)"),
            ("pipeline (nightly.yaml)", f"wall ÷ lm stage seconds, {n['docs']} demo docs", n["wall_vs_lm_stage"],
             f"{n['wall_vs_lm_stage']:.3f}, target ≤ 1.15: wall {_n(n['wall_seconds'])} s: head "
             f"{_n(n['head_seconds'])} s before the lm stage's first batch, "
             f"tail {_n(n['tail_seconds'])} s after its last; stage s: {split}"),
            ("pipeline (nightly.yaml)", "lm actor peak PSS vs its declared resources.memory",
             mem["peak_pss_mib"] / mem["declared_mib"],
             f"PSS {_n(mem['peak_pss_mib'])}, USS {_n(mem['peak_uss_mib'])}, RSS {_n(mem['peak_rss_mib'])}"
             + (f" (kernel's RSS high-water mark {_n(mem['rss_high_water_mib'])})" if "rss_high_water_mib" in mem else "")
             + f" vs {_n(mem['declared_mib'])} MiB declared")]
    if "scale" in r:
        s = r["scale"]
        base, top = s["runs"][0], s["runs"][-1]
        scale = (f"{top['docs'] // base['docs']}× vs 1× ({_n(top['docs'])} vs {_n(base['docs'])} "
                 f"synthetic docs, {' + '.join(s['stages'])})")
        rows += [_marginal_row("pipeline (CPU stages)", s),
                 ("pipeline (CPU stages)", f"driver peak RSS, {scale}", s["rss_ratio_largest_vs_1x"],
                  f"{_n(top['driver_peak_rss_mb'])} vs {_n(base['driver_peak_rss_mb'])} MB")]
    return rows


def first_run_rows(r: dict) -> list[Row]:
    st = r["steps"]
    return [("first_run", "clone + install (empty pip cache) + cold make run, vs the 600 s target",
             r["first_run_cold_seconds"] / 600,
             f"{_n(r['first_run_cold_seconds'])} s: clone {_n(st['clone']['seconds'])}, install "
             f"{_n(st['install_empty_pip_cache']['seconds'])} (warm pip cache {_n(st['install_warm_pip_cache']['seconds'])}), "
             f"make run {_n(st['run_cold']['seconds'])}"),
            ("first_run", "warm make run (assets cached, fresh output), vs the 150 s target",
             st["run_warm"]["seconds"] / 150,
             f"{_n(st['run_warm']['seconds'])} s (pipeline {_n(st['run_warm'].get('pipeline_seconds', 0))} s); "
             f"output kept, result cache: {_n(st['run_warm_cached']['seconds'])} s")]


def tokenizer_rows(r: dict) -> list[Row]:
    rate = r["docs_per_s"]
    what = f"token_premium stage ({len(r['tokenizers'])} tokenizers, 1 actor) vs raw batch encode, docs/s"
    return [("tokenizer_stage", f"{what}, wall (actor start included)", r["stage_vs_raw_batch_wall"],
             f"{_n(rate['stage_wall'])} vs {_n(rate['raw_batch'])} docs/s ({r['docs']} docs)"),
            ("tokenizer_stage", f"{what}, compute in the actor (start-up and transport excluded)",
             r["stage_vs_raw_batch_in_actor"],
             f"{_n(rate['stage_in_actor'])} vs {_n(rate['raw_batch'])} docs/s (raw 1 thread "
             f"{_n(rate['raw_1thread'])}; stage from its first output batch {_n(rate['stage_steady'])}; "
             f"whole run_pipeline {_n(rate['e2e'])})")]


def preselect_rows(r: dict) -> list[Row]:
    raw = _n(r["raw_docs_per_s_per_core"])
    what = "preselect stage (1 actor) vs raw fastText predict loop, docs/s per core"
    return [("preselect_fasttext", f"{what}, wall", r["stage_vs_raw_wall"],
             f"{_n(r['stage_docs_per_s_per_core_wall'])} vs {raw} ({_n(r['docs'])} docs)"),
            ("preselect_fasttext", f"{what}, compute in the actor (start-up and transport excluded)",
             r["stage_vs_raw_in_actor"],
             f"{_n(r['stage_docs_per_s_per_core_in_actor'])} vs {raw} (stage from its first output batch "
             f"{_n(r['stage_docs_per_s_per_core_steady'])}; run_pipeline "
             f"{_n(r['e2e']['docs_per_s_per_core'])} per core)")]


def lm_engine_rows(r: dict) -> list[Row]:
    full = _n(r["vllm_full_tokens_per_s"])
    memory = r["rows"]["vllm_full"]
    return [
        ("lm_engine (CPU)", "vLLM engine (6 exact metrics + PAWN + SAE heads) vs vLLM prompt logprobs "
         "(top-20), tokens/s (target ≥ 0.9)", r["vllm_full_vs_vllm_prompt_logprobs"],
         f"{full} vs {_n(r['vllm_prompt_logprobs_tokens_per_s'])} ({_n(r['tokens'])} tokens)"),
        ("lm_engine (CPU)", "vLLM engine vs torch engine, same config, tokens/s (target ≥ 1.5)",
         r["vllm_full_vs_torch"], f"{full} vs {_n(r['torch_full_tokens_per_s'])}"),
        ("lm_engine (CPU)", "torch engine (6 metrics + heads) vs plain HF loop (logprob only), tokens/s",
         r["torch_vs_plain_hf"], f"{_n(r['torch_full_tokens_per_s'])} vs {_n(r['plain_hf_tokens_per_s'])}"),
        ("lm_engine (CPU)", "vLLM engine peak RSS after 3× the documents more in the stage's batches of 32 "
         "vs after the timed passes (varies between runs: see bench/README.md)",
         round(memory["peak_rss_mib_after_3x_docs"] / memory["peak_rss_mib"], 3),
         f"{_n(memory['peak_rss_mib_after_3x_docs'])} vs {_n(memory['peak_rss_mib'])} MiB "
         f"(max_batch_tokens {_n(r['max_batch_tokens'])})"),
    ]


def one_pass_rows(r: dict) -> list[Row]:
    b = r["best_seconds"]
    return [("one_pass", f"one LM pass per consumer (PAWN, SAE, scores) ÷ one shared pass, seconds, "
             f"{r['docs']} docs", r["per_operator_vs_one_pass"],
             f"{_n(r['per_operator_seconds'])} s ({_n(b['pawn'])} + {_n(b['sae'])} + {_n(b['scores'])}) vs "
             f"{_n(r['one_pass_seconds'])} s ({_n(r['one_pass_tokens_per_s'])} tokens/s)")]


ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "soak": soak_rows, "pipeline_nightly": pipeline_rows, "tokenizer_stage": tokenizer_rows,
    "preselect_fasttext": preselect_rows, "lm_engine_cpu": lm_engine_rows, "one_pass": one_pass_rows,
    "first_run": first_run_rows,
}


#: Testbed result -> {score key: label}, in table order (AUROC and TPR@5%FPR, mean ± sd over seeds).
TESTBEDS: dict[str, dict[str, str]] = {
    "membership_testbed": {"ppl": "PPL", "zlib": "zlib", "lowercase": "lowercase", "mink": "Min-K% (k = 0.2)",
                           "minkpp": "Min-K%++ (k = 0.2)", "dcpdd": "DC-PDD (a = 0.01)"},
    "detection_testbed": {"pawn_score": "PAWN", "binoculars": "Binoculars", "ppl": "PPL",
                          "mean_entropy": "GLTR mean entropy", "mean_log_rank": "GLTR mean log-rank"},
}


def testbed_table(result: dict, labels: dict[str, str], stale: str = "") -> str:
    """AUROC and TPR@5%FPR, mean ± sd over the seeds, of each score of a testbed result."""
    seeds = result["seeds"]
    lines = ["| score (direction) | AUROC | TPR@5%FPR |", "| --- | --- | --- |"]
    for key, label in labels.items():
        s = result["summary"][key]
        lines.append(f"| {label} ({s['direction']}) | {s['auroc_mean']:.3f} ± {s['auroc_sd']:.3f} | "
                     f"{s['tpr_mean']:.3f} ± {s['tpr_sd']:.3f} |")
    lines.append(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}), sd with ddof 1; "
                 f"`{result['command']}`, {result['seconds']:.0f} s on {result['machine']['cpus']} CPUs, "
                 f"{result['measured_at'][:10]}{stale}.")
    return "\n".join(lines)


def write_testbeds(failed: set[str]) -> None:
    """Each testbed's table between its markers, from its result file (when both exist)."""
    for name, labels in TESTBEDS.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        stale = " (failed last run: these are older figures)" if name in failed else ""
        write_readme(testbed_table(json.loads(path.read_text()), labels, stale),
                     f"<!-- {name}:start -->", f"<!-- {name}:end -->")


def table(failed: set[str]) -> str:
    """The markdown table from ``bench/results/*.json`` (results in ``failed`` marked stale)."""
    lines = ["| benchmark | compared | ratio | absolute numbers | command |",
             "| --- | --- | --- | --- | --- |"]
    for name, rows in ROWS.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        stale = f" (failed last run; figures of {result['measured_at'][:10]})" if name in failed else ""
        try:
            built = rows(result)
        except KeyError as err:  # a result file from an older version of its benchmark
            print(f"skipping {path.name} in the table: no field {err}", file=sys.stderr)
            continue
        for bench, compared, ratio, absolute in built:
            cells = [f"{bench}{stale}", compared, f"{ratio:#.3g}×", absolute, f"`{result['command']}`"]
            lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def write_readme(text: str, start: str = START, end: str = END, path: Path = README) -> None:
    """Replace what lies between the markers ``start`` and ``end`` in ``path`` (bench/README.md)."""
    readme = path.read_text()
    if start not in readme or end not in readme:
        raise SystemExit(f"{path} lacks the markers {start} / {end}")
    head, rest = readme.split(start, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def run(bench: Bench, timeout: float) -> str | None:
    """Run one benchmark; None when it succeeded, else why it failed."""
    cmd = [sys.executable, "-m", f"bench.{bench.module}", *bench.args]
    print(f"==> {' '.join(['python', *cmd[1:]])}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:g} s"
    print(f"    {time.perf_counter() - start:.0f} s, exit {proc.returncode}", flush=True)
    return None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-2000:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[b.module for b in BENCHES], help="run only these")
    parser.add_argument("--table-only", action="store_true", help="rebuild the tables of bench/README.md, run nothing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    args = parser.parse_args()
    chosen = [] if args.table_only else [b for b in BENCHES if not args.only or b.module in args.only]
    failures = {b.result: why for b in chosen if (why := run(b, args.timeout)) is not None}
    write_readme(table(set(failures)))
    write_testbeds(set(failures))
    print(f"==> {README.relative_to(ROOT)}: benchmark and testbed tables rewritten from {RESULTS}")
    for name, why in failures.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
