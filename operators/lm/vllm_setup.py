"""Loading a model into vLLM for the ``vllm`` backend: options, environment and ``vllm.LLM`` arguments.

Inside a Ray actor the engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set
before vLLM is imported): the exact engine reaches into the loaded model (hidden-state taps), which
only works in-process, and on the 2-core dev box a separate core process took ~26 s to first result
against ~15 s in-process, with two more processes competing for the actor's cores. In-process,
vLLM binds the actor's OpenMP threads and replaces ``torch.set_num_threads`` for the whole process:
harmless in a dedicated actor, and why tests and benchmarks keep vLLM in its own actor or child
process. On CPU vLLM would reserve ``gpu_memory_utilization`` of RAM (KV cache included) and
touch it; by default the KV cache is sized instead to what prefill-only requests use, one step's
tokens plus one document (``kv_bytes_per_token``; 405 MiB for SmolLM2-135M in fp32 at 8,192
tokens, 1,024 per document). ``kv_cache_gib`` or ``gpu_memory_utilization`` set it by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from operators.base import StrictModel
from operators.lm.models import ModelSpec

CPU_MEMORY_SHARE, GPU_MEMORY_SHARE = 0.3, 0.85


class VLLMOptions(StrictModel):
    """Engine settings for ``backend: vllm`` (ignored by the torch backend)."""

    mode: Literal["exact", "prompt_logprobs"] = Field(
        "exact", description="exact: full-vocabulary metrics, taps, heads, observer (pooling runner); "
        "prompt_logprobs: vLLM's top-k prompt logprobs only, with *_topk estimates (cheaper, fewer features).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory (of RAM on CPU); default 0.3 CPU, 0.85 GPU.")
    top_k: int = Field(20, ge=1, le=1000, description="prompt_logprobs mode: logprobs kept per position.")
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0, description="Default: the stage's max_batch_tokens.")
    enforce_eager: bool | None = Field(
        None, description="Default: True (exact mode needs it: its taps hook the model's layers), "
        "prompt_logprobs mode: True on CPU, False on GPU.")
    tensor_parallel_size: int = Field(1, ge=1)
    kv_cache_gib: float | None = Field(None, gt=0, description="Fixed KV-cache size instead of the share.")
    multiprocessing: bool = Field(False, description="Run vLLM's engine core in its own process "
                                  "(prompt_logprobs mode only).")

    def check_exact(self) -> None:
        """The exact engine reads hidden states in-process from an eager model; ValueError if these
        options forbid it (the lm stage calls this for its ``vllm`` backend)."""
        if self.multiprocessing or self.tensor_parallel_size > 1:
            raise ValueError("vllm.mode 'exact' reads the model's hidden states in-process: it needs "
                             "multiprocessing: false and tensor_parallel_size: 1")
        if self.enforce_eager is False:
            raise ValueError("vllm.mode 'exact' hooks the model's layers, which a compiled graph skips: "
                             "leave enforce_eager unset or true")


def vllm_environment(options: VLLMOptions, cpu_threads: int | None = None) -> None:
    """Process environment vLLM reads at import / engine start.

    On CPU vLLM would pin one OpenMP thread per core it sees; a pinned thread whose core another
    process also uses stalls every parallel region (decoding ran ~20x slower on the 2-core dev box
    next to a busy neighbour), and a pipeline's actors share cores. So threads are not pinned
    (``VLLM_CPU_OMP_THREADS_BIND=nobind``; set the variable to pin) and their number is
    ``cpu_threads`` (default: the cores this process may use).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if options.multiprocessing else "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    threads = cpu_threads or len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # A Ray worker's OpenMP runtime is already up with Ray's OMP_NUM_THREADS (1 for a fractional
    # CPU), and vLLM's CPU worker then turns torch.set_num_threads into a no-op: set it now, with
    # the function vLLM does not replace (the lm stage ran on one thread in a Ray actor otherwise).
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch._C.set_num_threads(threads)


def engine_kwargs(spec: ModelSpec, max_tokens: int, options: VLLMOptions, on_gpu: bool,
                  max_batch_tokens: int | None = None, *, exact: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for this model and options; ``exact``: the pooling runner of
    the exact engine, else the top-k prompt-logprobs engine's."""
    where, _ = spec.load_args()
    kwargs: dict[str, Any] = {
        "model": str(Path(spec.path).expanduser()) if spec.is_gguf else where,
        # ids come from our TextEncoder; vLLM's own tokenizer only serves its start-up checks
        "tokenizer": where,
        "skip_tokenizer_init": spec.is_gguf,
        "dtype": spec.dtype if spec.dtype != "auto" else ("auto" if on_gpu else "float32"),
        # prompt_logprobs: the prompt plus the one token vLLM insists on sampling
        "max_model_len": max_tokens if exact else max_tokens + 1,
        "gpu_memory_utilization": options.gpu_memory_utilization
        or (GPU_MEMORY_SHARE if on_gpu else CPU_MEMORY_SHARE),
        "enforce_eager": exact or (options.enforce_eager if options.enforce_eager is not None else not on_gpu),
        "max_num_seqs": options.max_num_seqs,
        "tensor_parallel_size": options.tensor_parallel_size,
        "enable_prefix_caching": False,  # every prompt position must be computed
        "trust_remote_code": spec.trust_remote_code,
        "seed": 0,
    }
    if exact:
        from vllm.config import PoolerConfig

        # the causal LM as a per-token pooling model: every position's final hidden state, unnormalised
        kwargs.update(runner="pooling", convert="embed", pooler_config=PoolerConfig(
            task="token_embed", pooling_type="ALL", use_activation=False))
    else:
        kwargs["max_logprobs"] = options.top_k
    if spec.revision:
        kwargs["revision"] = spec.revision
    batched = options.max_num_batched_tokens or max_batch_tokens
    if batched:
        kwargs["max_num_batched_tokens"] = max(batched, kwargs["max_model_len"])
    if options.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
    elif not on_gpu and options.gpu_memory_utilization is None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(spec, max_tokens, max_batch_tokens or 8192, options)
    return kwargs


def kv_cache_bytes(spec: ModelSpec, max_tokens: int, max_batch_tokens: int, options: VLLMOptions) -> int:
    """The default KV cache on CPU: one step's tokens plus one whole document, in float32 (the share
    of RAM would pin ~30% of it per actor; prefill-only requests need no more)."""
    tokens = max(options.max_num_batched_tokens or max_batch_tokens, max_tokens + 1) + max_tokens + 1
    return kv_bytes_per_token(spec, 4 if spec.dtype in ("auto", "float32") else 2) * tokens


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> int:
    """Bytes of K and V one token takes in every layer: 2 · layers · kv_heads · head_dim · dtype size.
    Reads a local ``config.json`` directly (no transformers import at config time)."""
    local = Path(spec.path).expanduser() / "config.json"
    if local.is_file():
        config = json.loads(local.read_text())
        config = config.get("text_config", config)
    else:
        from transformers import AutoConfig

        where, load_kwargs = spec.load_args()
        config = AutoConfig.from_pretrained(where, **load_kwargs).get_text_config().to_dict()
    def key(*names: str) -> int:  # HF's attribute_map aliases (GPT-2/GPT-J: n_head, n_embd, n_layer)
        found = next((config[n] for n in names if config.get(n)), None)
        if found is None:
            raise ValueError(f"model {spec.name!r}: config.json has none of {list(names)}")
        return int(found)

    heads = key("num_attention_heads", "n_head", "num_heads")
    head_dim = config.get("head_dim") or key("hidden_size", "n_embd", "d_model") // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * key("num_hidden_layers", "n_layer", "num_layers") * kv_heads * head_dim * dtype_bytes


def load_llm(spec: ModelSpec, kwargs: dict[str, Any]) -> Any:
    """``vllm.LLM(**kwargs)``; a model vLLM cannot load is a ValueError naming it and the backend."""
    from vllm import LLM

    try:
        return LLM(**kwargs)
    except Exception as err:  # vLLM raises many types (ValueError, RuntimeError, pydantic errors)
        reason = " ".join(str(err).split())[:600]
        raise ValueError(f"backend 'vllm' cannot load model {spec.name!r} ({spec.path}): "
                         f"{type(err).__name__}: {reason}") from err
