"""Host RAM of an ``lm`` stage's actor, for ``resources.memory``'s default (measured with
``python -m bench.stage_memory``; docs/config.md, "Memory defaults")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from operators.base import MiB
from operators.lm.engine import batch_tokens_default
from operators.lm.models import ModelSpec, is_local_path
from operators.lm.vllm_setup import kv_cache_bytes

if TYPE_CHECKING:
    from operators.lm.stage import LMStageConfig

#: An lm actor's RAM beyond its weights. Measured (bench/stage_memory.py): SmolLM2-135M (513 MiB of
#: float32 weights) on CPU, batch 32, peaks at 969 MiB USS; Ray Data wants 1.25x = 1211 MiB, and
#: 768 MiB + the weights leaves room for longer documents.
LM_ACTOR_OVERHEAD = 768 * MiB
#: vLLM's own runtime per loaded model beyond the torch engine's (its KV cache on CPU comes on top,
#: ``vllm_setup.kv_cache_bytes``). Measured the same way: SmolLM2-135M with backend vllm at
#: max_tokens 256, batch 32, peaks at 2,185 MiB USS. In real runs of the nightly lm actor (2,048
#: tokens per step: a 101 MiB KV cache) the resident memory between batches stays at 1.8-2.0 GiB
#: (the engine returns malloc's free memory after each batch, ``release_freed_memory``), but the
#: peak within a batch (the kernel's high-water mark) differs between runs of the same batches:
#: 2.0-2.2 GiB in four of five pipeline runs, 3.0 GiB in the fifth (``python -m bench.pipeline``),
#: and 2.2-3.0 GiB for the operator alone on the demo's first 512 documents (docs/internals.md).
#: 1,920 MiB: 768 + 513 + 1,920 + 101 + 64 = 3,366 MiB declared, 1.09x the highest seen.
VLLM_RUNTIME_MEMORY = 1920 * MiB
#: A PAWN head on the LM's device (its weights and per-batch features), measured the same way.
PAWN_HEAD_MEMORY = 64 * MiB
#: Weights of a model we cannot size on disk (a Hub id not in the local cache): a 1B model in bf16.
UNSIZED_MODEL_BYTES = 2048 * MiB


def model_file_bytes(spec: ModelSpec) -> int:
    """Bytes of a local model's weight files (safetensors / bin / gguf); a flat guess otherwise."""
    if not is_local_path(spec.path):
        return UNSIZED_MODEL_BYTES
    local = Path(spec.path).expanduser()
    if local.is_file():
        return local.stat().st_size
    files = [p for pattern in ("*.safetensors", "*.bin", "*.gguf") for p in local.glob(pattern)]
    return sum(p.stat().st_size for p in files) or UNSIZED_MODEL_BYTES


def model_ram_bytes(spec: ModelSpec, on_gpu: bool) -> int:
    """Host RAM the weights take: their size on disk, doubled when 16-bit weights run in float32 on CPU."""
    size = model_file_bytes(spec)
    config = Path(spec.path).expanduser() / "config.json" if is_local_path(spec.path) else None
    stored = ""
    if config is not None and config.is_file():
        meta = json.loads(config.read_text())
        stored = str(meta.get("torch_dtype") or meta.get("dtype") or "")
    upcast = not on_gpu and spec.dtype in ("auto", "float32") and stored in ("bfloat16", "float16")
    return 2 * size if upcast else size


def engine_memory_bytes(cfg: LMStageConfig, on_gpu: bool, with_observer: bool = True) -> int:
    """Host RAM of one engine of ``cfg``: the measured actor overhead, the weights in RAM, and with
    backend vllm its runtime and (on CPU) its KV cache, per loaded model."""
    models = [cfg.model] + ([cfg.observer] if with_observer and cfg.observer is not None else [])
    total = LM_ACTOR_OVERHEAD + sum(model_ram_bytes(m, on_gpu) for m in models)
    if cfg.model.backend == "vllm":
        total += VLLM_RUNTIME_MEMORY * len(models)
        if not on_gpu:
            step = cfg.max_batch_tokens or batch_tokens_default(on_gpu)
            total += sum(kv_cache_bytes(m, cfg.max_tokens, step, cfg.vllm) for m in models)
    return total
