"""``python -m jobs.demo.vllm_generate JOB.json``: sample the demo corpus's machine-written
continuations with vLLM's CPU backend, in a process of its own.

vLLM binds the process's OpenMP threads and replaces ``torch.set_num_threads`` when it starts in
process, so ``jobs.demo.corpus`` runs it here, in a child, and reads back the continuations.

The job file holds ``{"model": dir, "prompts": [...], "params": GenerationParams fields,
"threads": n, "output": path}``; the output file gets ``{"continuations": [...]}`` in prompt order.
Every prompt has its own seed (``params.seed + i``), so a continuation does not depend on how vLLM
batches. The OpenMP threads are not pinned (``VLLM_CPU_OMP_THREADS_BIND=nobind``, ``threads``
of them): pinned threads on cores another process also uses made decoding ~20x slower on the 2-core
dev box (4 continuations: 294 s pinned, 14 s unpinned with 1 thread).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: KV cache for all prompts at once: 120 sequences of ≤ 512 tokens of SmolLM2-135M take ~1.4 GiB.
KV_CACHE_BYTES = 2 << 30
MAX_MODEL_LEN = 512


def sample(model: str, prompts: list[str], params: dict[str, Any], threads: int = 1) -> list[str]:
    """Raw continuations of ``prompts`` (special tokens skipped), all prompts in one batch."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(threads)

    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=params["seed"],
              max_model_len=MAX_MODEL_LEN, max_num_seqs=len(prompts), kv_cache_memory_bytes=KV_CACHE_BYTES)
    sampling = [SamplingParams(temperature=params["temperature"], top_p=params["top_p"], top_k=params["top_k"],
                               repetition_penalty=params["repetition_penalty"],
                               max_tokens=params["max_new_tokens"], seed=params["seed"] + i,
                               skip_special_tokens=True)
                for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    print(f"vllm_generate: {len(prompts)} continuations in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return [out.outputs[0].text for out in outputs]


def main(argv: list[str]) -> None:
    job = json.loads(Path(argv[0]).read_text())
    texts = sample(job["model"], job["prompts"], job["params"], job.get("threads", 1))
    Path(job["output"]).write_text(json.dumps({"continuations": texts}, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])
