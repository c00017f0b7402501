"""Peak memory (USS, as Ray Data's high-memory detector measures it) of one actor per stage kind.

Each stage runs as a real Ray actor (``StageRunner``) over a few batches of demo-like documents;
a thread in the actor samples its own USS every 20 ms. The defaults in ``StageConfig.default_memory``
and ``operators.lm.memory.LM_ACTOR_OVERHEAD`` come from these numbers plus 25 % headroom, which is
what Ray Data asks for (``memory = 1.25 × max USS``) before it stops warning.

    python -m bench.stage_memory          # writes bench/results/stage_memory.json
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import ray

from bench.common import save

MiB = 1 << 20
DEMO_MODEL = Path.home() / ".cache" / "curate" / "demo" / "smollm2-135m-instruct"
TEXTS = [
    ("The quick brown fox jumps over the lazy dog. " * (1 + i % 12)) + f"Document {i}." for i in range(64)
]


@ray.remote(num_cpus=1)
class Probe:
    """Builds one stage's operator and reports this process's peak USS while running batches."""

    def __init__(self, stage) -> None:
        import psutil

        from pipelines.stage_runner import StageRunner

        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.baseline = self.proc.memory_full_info().uss
        threading.Thread(target=self._sample, daemon=True).start()
        self.runner = StageRunner(stage)

    def _sample(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_full_info().uss)
            time.sleep(0.02)

    def run(self, batch: pa.Table, batch_size: int, repeats: int) -> dict:
        for _ in range(repeats):
            for start in range(0, batch.num_rows, batch_size):
                out = self.runner(batch.slice(start, batch_size))
                _ = out.num_rows
        time.sleep(0.1)
        self.stop = True
        return {"worker_baseline_mib": round(self.baseline / MiB), "peak_uss_mib": round(self.peak / MiB)}


def stages() -> dict[str, dict]:
    model = {"name": "smollm2", "path": str(DEMO_MODEL)}
    lm = {"op": "lm", "model": model, "max_tokens": 256, "cpu_threads": 1, "resources": {"batch_size": 32}}
    return {
        "token_premium": {
            "op": "token_premium",
            "tokenizers": [
                {"name": "smollm2", "kind": "hf", "path": str(DEMO_MODEL)},
                {"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"},
                {"name": "o200k", "kind": "tiktoken", "encoding": "o200k_base"},
            ],
            "resources": {"batch_size": 256},
        },
        "lowercase_text": {"op": "lowercase_text", "resources": {"batch_size": 1024}},
        "lm": lm,
        "lm_vllm": {**lm, "model": {**model, "backend": "vllm"}},
        "scores": {"op": "scores", "model": "smollm2", "zlib": True, "resources": {"batch_size": 256}},
    }


def main() -> None:
    from pipelines.config import parse_config

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    docs = pa.table(
        {
            "id": [str(i) for i in range(len(TEXTS))],
            "text": TEXTS,
            "quarantine_reason": pa.nulls(len(TEXTS), pa.string()),
            "quarantine_stage": pa.nulls(len(TEXTS), pa.string()),
        }
    )
    raw = stages()
    cfg = parse_config({"name": "mem", "input": {"url": "/x"}, "stages": [raw["lm"], raw["scores"]]})
    lm_cfg, scores_cfg = cfg.stages
    # the scores stage reads the lm stage's columns: compute them once, in the driver
    from pipelines.stage_runner import TIMING_PREFIX, StageRunner

    scored = StageRunner(lm_cfg)(docs)
    scored = scored.drop_columns([c for c in scored.column_names if c.startswith(TIMING_PREFIX)])
    results = {}
    for name, stage_raw in raw.items():
        stage = {"lm": lm_cfg, "scores": scores_cfg}.get(name) or parse_config(
            {"name": "mem", "input": {"url": "/x"}, "stages": [stage_raw]}
        ).stages[0]
        batch = scored if name == "scores" else docs
        probe = Probe.remote(stage)
        results[name] = ray.get(probe.run.remote(batch, stage.resources.batch_size, 2))
        results[name]["recommended_mib"] = round(1.25 * results[name]["peak_uss_mib"])
        ray.kill(probe)
        print(name, results[name], flush=True)
    weights = sum(p.stat().st_size for p in DEMO_MODEL.glob("*.safetensors"))
    save("stage_memory", {"stages": results, "lm_weights_mib": round(weights / MiB)})


if __name__ == "__main__":
    main()
