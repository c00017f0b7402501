"""LM engine throughput on the same documents: vLLM (exact), vLLM prompt logprobs, torch, plain HF.

    python -m bench.lm_engine            # CPU, demo model, 100 demo docs -> bench/results/lm_engine_cpu.json
    python -m bench.lm_engine --gpu      # GPU, random Llama-3.2-1B shapes, bf16 -> lm_engine_gpu.json
    python -m bench.lm_engine --gpu --smoke --docs 8 --max-tokens 64   # the GPU path on CPU, tiny

CPU rows, each in its own child process (vLLM binds a process's OpenMP threads), all on the same
token ids, best of ``--repeats`` passes after a warm-up pass:

* ``vllm_full``: the ``lm`` stage's engine with ``backend: vllm`` (exact mode): all six metrics,
  the demo PAWN head and the demo SAE head (layer 15), every feature the pipeline uses;
* ``vllm_prompt_logprobs``: ``vllm.mode: prompt_logprobs``, top-20 (the cheaper estimates);
* ``torch_full``: the same stage config with ``backend: torch``;
* ``plain_hf``: ``model(input_ids, attention_mask).logits`` -> ``log_softmax`` -> ``gather``
  (logprob only) on a stock HF model, length-sorted token-budget batches.

The targets are ratios in one run: ``vllm_full_vs_vllm_prompt_logprobs`` ≥ 0.9 and
``vllm_full_vs_torch`` ≥ 1.5. ``vllm_full`` also records the child's peak resident memory after
the timed passes and after three times the documents more, fed in the stage's batches of 32
(``max_batch_tokens`` 8192): equal peaks mean memory does not grow with the corpus.

GPU (torch engine only: vLLM does not fit on the benchmark box): the engine with a layer tap vs the
plain loop and a one-document-at-a-time loop. MFU = (2·P·tokens + Σ_docs 2·L·T_d²·d) / seconds /
989e12: P = parameters in matmuls (the tied embedding counts once, as the lm_head), the second term
the causal attention score and value products (QKᵀ and AV, 2·T²·d each per layer, halved by the
causal mask); 989e12 = H100/H200 dense bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, save
from operators.lm.batch import plan_batches
from operators.lm.models import Encoded, ModelSpec
from operators.lm.torch_engine import TorchEngine

H100_BF16_DENSE = 989e12
LLAMA_32_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "tie_word_embeddings": True}


def demo_texts(n: int) -> list[str]:
    """The demo corpus's human-written docs (Python docs, 400-2000 chars), first ``n``."""
    from jobs.demo.corpus import python_doc_pool

    return python_doc_pool()[:n]


def long_texts(n: int, min_chars: int) -> list[str]:
    """``n`` texts of at least ``min_chars``, each a different rotation of the demo docs."""
    pool = demo_texts(400)
    out = []
    for i in range(n):
        parts, size, j = [], 0, i
        while size < min_chars:
            parts.append(pool[j % len(pool)])
            size += len(parts[-1])
            j += 7
        out.append("\n\n".join(parts))
    return out


def train_tokenizer(out: str, vocab_size: int = 8192) -> None:
    """A byte-level BPE tokenizer trained on the demo docs (offline: the GPU box has no network)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(demo_texts(400), vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(out)


@torch.inference_mode()
def plain_loop(model: torch.nn.Module, docs: list[Encoded], batches: list[list[int]], device: str) -> None:
    """What one writes without the engine: padded batch, full logits, log_softmax, gather."""
    for group in batches:
        rows = [docs[i].ids for i in group]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits                  # [B,T,V]
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        _per_doc = [lp[b, : len(r) - 1].cpu().numpy() for b, r in enumerate(rows)]


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(engine: TorchEngine, docs: list[Encoded], repeats: int, stock: torch.nn.Module | None = None,
            heads: list | None = None) -> dict:
    """Median tokens/s of the engine and the plain loop on the same batches.

    ``stock``: an unmodified copy of the model for the plain loop. On CPU the engine routes its
    linears through oneDNN, so the plain loop also runs on the engine's model
    (``plain_hf_same_linears``) to show the metrics' own cost.
    """
    batches = plan_batches([len(d.ids) for d in docs], engine.max_batch_tokens)
    tokens = sum(len(d.ids) for d in docs)
    runs = {"engine": lambda group: engine.score([docs[i] for i in group], heads),
            "plain_hf": lambda group: plain_loop(stock or engine.model, docs, [group], engine.device)}
    if stock is not None:
        runs["plain_hf_same_linears"] = lambda group: plain_loop(engine.model, docs, [group], engine.device)
    for fn in runs.values():  # warm-up
        fn(batches[-1])
    wall: dict[str, list[list[float]]] = {name: [] for name in runs}   # [repeat][batch]
    cpu: dict[str, float] = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):  # batch by batch, the paths back to back: load drift hits all alike
        for name in runs:
            wall[name].append([])
        for group in batches:
            for name, fn in runs.items():
                start = time.process_time()
                wall[name][-1].append(timed(lambda fn=fn, group=group: fn(group), engine.device))
                cpu[name] += time.process_time() - start
    out = {"docs": len(docs), "tokens": tokens, "batches": len(batches),
           "max_batch_tokens": engine.max_batch_tokens, "repeats": repeats,
           "round_seconds": {k: [round(sum(r), 2) for r in v] for k, v in wall.items()},
           "cpu_seconds_per_round": {k: round(v / repeats, 2) for k, v in cpu.items()}}
    for name in runs:  # best of the repeats, batch by batch
        best = sum(min(r[b] for r in wall[name]) for b in range(len(batches)))
        out[f"{name}_tokens_per_s"] = round(tokens / best, 1)
    for name in runs:
        if name != "engine":
            out[f"engine_vs_{name}"] = round(out["engine_tokens_per_s"] / out[f"{name}_tokens_per_s"], 3)
    return out


def naive_one_doc(engine: TorchEngine, docs: list[Encoded], engine_tokens_per_s: float,
                  n_docs: int = 64) -> dict:
    """The naive loop: one document per forward (plain HF, full logits), on the first ``n_docs``."""
    subset = docs[:n_docs]
    plain_loop(engine.model, subset, [[0]], engine.device)  # warm-up
    seconds = timed(lambda: plain_loop(engine.model, subset, [[i] for i in range(len(subset))], engine.device),
                    engine.device)
    rate = sum(len(d.ids) for d in subset) / seconds
    return {"naive_one_doc_tokens_per_s": round(rate, 1), "naive_one_doc_docs": len(subset),
            "engine_vs_naive_one_doc": round(engine_tokens_per_s / rate, 3)}


#: CPU rows: how each child builds its scorer (see the module docstring).
CPU_ROWS = ("vllm_full", "vllm_prompt_logprobs", "torch_full", "plain_hf")


def stage_config(row: str, model_dir: str, max_batch_tokens: int) -> Any:
    """The ``lm`` stage config of a CPU row (heads from the demo assets, built once and cached)."""
    from jobs.demo.constants import DEMO_LAYER
    from jobs.demo.pawn import prepare_demo_pawn
    from jobs.demo.sae import prepare_demo_sae
    from operators.lm.stage import LMStageConfig

    backend = "torch" if row == "torch_full" else "vllm"
    cfg: dict[str, Any] = {"model": {"name": "m", "path": model_dir, "backend": backend},
                           "max_tokens": 1024, "max_batch_tokens": max_batch_tokens}
    if row == "vllm_prompt_logprobs":
        cfg["vllm"] = {"mode": "prompt_logprobs", "top_k": 20}
    else:
        quiet = lambda _m: None  # noqa: E731
        cfg["heads"] = [{"kind": "pawn", "params": {"path": str(prepare_demo_pawn(log=quiet))}},
                        {"kind": "sae", "params": {"sae": str(prepare_demo_sae(log=quiet)), "layer": DEMO_LAYER}}]
    return LMStageConfig(**cfg)


def peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def row_child(row: str, model_dir: str, ids_file: str, repeats: int, max_batch_tokens: int) -> dict:
    """(child process) tokens/s of one CPU row on the parent's token ids."""
    docs = [Encoded(ids, False) for ids in json.loads(Path(ids_file).read_text())]
    tokens = sum(len(d.ids) for d in docs)
    start = time.perf_counter()
    if row == "plain_hf":
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").to(device).eval()
        batches = plan_batches([len(d.ids) for d in docs], max_batch_tokens)
        run = lambda: plain_loop(model, docs, batches, device)  # noqa: E731
    else:
        op = stage_config(row, model_dir, max_batch_tokens).build()
        run = lambda: op.engine.score(docs, op.heads, set())  # noqa: E731
    load = time.perf_counter() - start
    run()  # warm-up
    seconds = [round(timed(run, "cuda" if torch.cuda.is_available() else "cpu"), 3) for _ in range(repeats)]
    out = {"tokens_per_s": round(tokens / min(seconds), 1), "round_seconds": seconds,
           "load_seconds": round(load, 1), "tokens": tokens, "peak_rss_mib": peak_rss_mib()}
    if row == "vllm_full":  # then 3x the documents in the stage's batches of 32: the peak must not move
        for first in range(0, 3 * len(docs), 32):
            op.engine.score((docs * 3)[first:first + 32], op.heads, set())
        out["peak_rss_mib_after_3x_docs"] = peak_rss_mib()
    return out


def run_row(row: str, model_dir: Path, docs: list[Encoded], repeats: int, max_batch_tokens: int) -> dict:
    """One CPU row in a child process on the same ids."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as ids_file:
        json.dump([d.ids for d in docs], ids_file)
        ids_file.flush()
        cmd = [sys.executable, "-m", "bench.lm_engine", "--row-child", row, "--model-dir", str(model_dir),
               "--ids", ids_file.name, "--repeats", str(repeats), "--max-batch-tokens", str(max_batch_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} child failed:\n{proc.stderr[-3000:]}")
    print(f"{row}: {proc.stdout.strip().splitlines()[-1]}", file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_bench(args: argparse.Namespace) -> None:
    from jobs.demo.model import prepare_demo_model
    from operators.lm.models import TextEncoder, load_tokenizer

    model_dir = prepare_demo_model(log=lambda _m: None)
    stage_config("vllm_full", str(model_dir), args.max_batch_tokens)  # heads built before timing
    tokenizer = load_tokenizer(ModelSpec(name="m", path=str(model_dir)))
    docs = [d for d in TextEncoder(tokenizer, 1024).encode(demo_texts(args.docs)) if d.scored]
    rows = {row: run_row(row, model_dir, docs, args.repeats, args.max_batch_tokens) for row in CPU_ROWS}
    rate = {row: r["tokens_per_s"] for row, r in rows.items()}
    result = {"model": "SmolLM2-135M-Instruct (fp32)", "docs": len(docs), "tokens": sum(len(d.ids) for d in docs),
              "max_batch_tokens": args.max_batch_tokens, "repeats": args.repeats,
              **{f"{row}_tokens_per_s": rate[row] for row in CPU_ROWS},
              "vllm_full_vs_vllm_prompt_logprobs": round(rate["vllm_full"] / rate["vllm_prompt_logprobs"], 3),
              "vllm_full_vs_torch": round(rate["vllm_full"] / rate["torch_full"], 3),
              "torch_vs_plain_hf": round(rate["torch_full"] / rate["plain_hf"], 3),
              "rows": rows, "load_average": [round(x, 2) for x in os.getloadavg()]}
    save("lm_engine_cpu", result)


SAE_TAP = 8


def random_heads_stage(model_dir: str, hidden: int, args: argparse.Namespace) -> Any:
    """The lm stage (torch backend) on ``model_dir`` with every metric, a PAWN head and a TopK SAE
    (random weights, saved next to the model) on layer ``SAE_TAP``."""
    from operators.detection.pawn import PawnConfig, PawnHead, save_pawn
    from operators.lm.stage import LMStageConfig
    from operators.sae.io import save_sparsify
    from operators.sae.model import SAEConfig, SparseAutoencoder

    save_pawn(PawnHead(PawnConfig(hidden_size=hidden)), f"{model_dir}/pawn")
    sae = SparseAutoencoder(SAEConfig(d_in=hidden, d_sae=4 * hidden, activation="topk", k=32))
    with torch.no_grad():
        for weight in (sae.W_enc, sae.W_dec):
            weight.normal_(0, hidden ** -0.5)
    save_sparsify(sae, f"{model_dir}/sae", layer=SAE_TAP)
    return LMStageConfig(model={"name": "m", "path": model_dir}, max_tokens=args.max_tokens,
                         max_batch_tokens=args.max_batch_tokens,
                         heads=[{"kind": "pawn", "params": {"path": f"{model_dir}/pawn"}},
                                {"kind": "sae", "params": {"sae": f"{model_dir}/sae", "layer": SAE_TAP}}])


def gpu_bench(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device (--smoke runs this path on CPU with tiny shapes)")
    shapes = {**LLAMA_32_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 9,
              "num_attention_heads": 4, "num_key_value_heads": 2} if args.smoke else LLAMA_32_1B
    config = LlamaConfig(**shapes)
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32 if args.smoke else torch.bfloat16)
        model.save_pretrained(tmp)
        train_tokenizer(tmp)  # ids < 8192: valid for any vocabulary above
        del model
        op = random_heads_stage(tmp, config.hidden_size, args).build()
        engine = op.engine
        docs = engine.encode(long_texts(args.docs, 8 * args.max_tokens))
        label = "random tiny Llama (fp32, smoke)" if args.smoke else "random Llama-3.2-1B shapes (bf16)"
        result = {"model": label, "heads": ["pawn (last layer)", f"sae (layer {SAE_TAP}, d_sae 4·H, k 32)"],
                  **compare(engine, docs, args.repeats, heads=op.heads)}
        result.update(naive_one_doc(engine, docs, result["engine_tokens_per_s"]))
    params = sum(p.numel() for p in engine.model.parameters())  # tied: embedding counted once (as lm_head)
    n_layers, width = config.num_hidden_layers, config.hidden_size
    attention = sum(2 * n_layers * len(d.ids) ** 2 * width for d in docs)
    flops = 2 * params * result["tokens"] + attention
    for name in ("engine", "plain_hf"):
        result[f"{name}_mfu"] = round(flops / (result["tokens"] / result[f"{name}_tokens_per_s"]) / H100_BF16_DENSE, 4)
    result.update(params=params, flops_per_round=flops)
    if args.smoke:
        print(json.dumps(result, indent=2))
        return
    result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    save("lm_engine_gpu", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU variant (random Llama-3.2-1B shapes, bf16)")
    parser.add_argument("--smoke", action="store_true", help="with --gpu: tiny shapes on CPU, nothing saved")
    parser.add_argument("--docs", type=int, default=None, help="documents (CPU 100, GPU 512)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="CPU 8192, GPU 16384")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--row-child", choices=CPU_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_batch_tokens = args.max_batch_tokens or (16384 if args.gpu else 8192)
    if args.row_child:
        print(json.dumps(row_child(args.row_child, args.model_dir, args.ids, args.repeats, args.max_batch_tokens)))
        return
    args.docs = args.docs or (512 if args.gpu else 100)
    print(f"machine: {machine()}", file=sys.stderr)
    (gpu_bench if args.gpu else cpu_bench)(args)


if __name__ == "__main__":
    main()
