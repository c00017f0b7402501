"""The vLLM engine: exact metrics, hidden-state taps, heads and a Binoculars observer, on vLLM.

vLLM runs the causal LM as a per-token pooling model (``runner: pooling``, ``pooling_type: ALL``,
see ``operators.lm.vllm_setup``): ``LLM.encode`` hands back, for every prompt token, the decoder's
final (normed) hidden state, the LM head's input. From there the engine does what the torch
engine does, with the same code (``operators.lm.batch``):

    ids ──vLLM──> [n, H·(k+1)] per document: k tapped layers, then the final state
        final state × output embedding (scale / softcap as in HF) = logits, ``rows`` at a time on
        the model's device → exact per-position metrics (never [N, V]); taps → heads, cached layers

Taps: ``HiddenTaps`` hooks the decoder blocks of the loaded model (in-process, eager) and makes
the model's forward return the tapped layers next to the final state, so vLLM's pooler slices
each request's rows for us, chunked prefill included. HF ``hidden_states[L]`` is the output of
block L-1, which in vLLM's fused-residual blocks is ``hidden + residual``; L = 0 is block 0's
input. The observer is a second vLLM model in the same actor.

The top-k prompt-logprob engine (``vllm.mode: prompt_logprobs``) is ``operators.lm.vllm_logprobs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from operators.lm.batch import LogitMetrics, batch_results, pad_tokens
from operators.lm.engine import batch_tokens_default
from operators.lm.heads import Head
from operators.lm.metrics import EXACT_METRICS
from operators.lm.models import (
    ModelSpec,
    TextEncoder,
    check_same_tokenizer,
    check_tokenizer_fits,
    is_local_path,
    load_tokenizer,
)
from operators.lm.shared import EngineBase, LMHead, decoder_blocks, hook_layers, keep_freed_memory
from operators.lm.vllm_setup import VLLMOptions, engine_kwargs, load_llm, vllm_environment

if TYPE_CHECKING:
    import torch
    from torch import nn

    from operators.lm.engine import DocResult, EngineSettings


def residual_stream(output: Any) -> torch.Tensor:
    """A vLLM block's output as HF's ``hidden_states`` entry (``hidden + residual`` when fused), in
    storage of its own: the model keeps updating its tensors in place (see ``HiddenTaps``)."""
    if isinstance(output, tuple):
        hidden, residual = output[0], output[1] if len(output) > 1 else None
        return hidden.clone() if residual is None else hidden + residual
    return output.clone()


class HiddenTaps:
    """Makes a vLLM model's forward return [tokens, H·(k+1)]: tapped layers (ascending), final state.

    Every tap is copied when captured: vLLM's blocks hand their residual on and update it in place
    (``fused_add_rms_norm`` on CUDA), so a reference kept until the end of the forward would read a
    later layer's residual stream.
    """

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        self.model, self.num_layers = model, num_layers
        self.blocks = decoder_blocks(model, num_layers)
        self.layers: list[int] = []
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        inner = model.forward

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            import torch

            final = inner(*args, **kwargs)
            if not self.layers:
                return final
            parts, self._captured = [self._captured[layer] for layer in self.layers], {}
            return torch.cat([*parts, final], dim=-1)

        model.forward = forward

    def set_layers(self, layers: set[int]) -> None:
        """Tap these HF indices (the final layer n is always the last block of the output)."""
        for handle in self._handles:
            handle.remove()
        self.layers = sorted(layers - {self.num_layers})
        self._handles = hook_layers(self.blocks, self.layers, self._put,
                                    block_input=block_input, block_output=residual_stream)

    def _put(self, layer: int, state: torch.Tensor) -> None:
        self._captured[layer] = state


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """Block 0's input in vLLM's (positions, hidden_states, residual) call, as a copy: block 0 takes
    this very tensor as its running residual, which the fused add-RMSNorm of vLLM's CUDA kernels
    updates in place (the CPU path allocates anew)."""
    return (kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]).clone()


#: HF config keys of output heads that ``LMHead`` does not reproduce: such a model is refused by name.
UNSUPPORTED_HEAD_KEYS = {
    "lm_head_multiplier": "Falcon-H1 multiplies the logits by lm_head_multiplier",
    "dim_model_base": "MiniCPM divides the final state by hidden_size / dim_model_base before the head",
    "output_multiplier_scale": "Grok-1 multiplies the logits by output_multiplier_scale",
}


def checkpoint_tensor(spec: ModelSpec, names: tuple[str, ...], required: bool = True) -> torch.Tensor | None:
    """The first of ``names`` found in the model's safetensors files (local dir or Hub snapshot);
    None when absent and not ``required``."""
    from safetensors import safe_open

    if is_local_path(spec.path):
        folder = Path(spec.path).expanduser()
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.path, revision=spec.revision, allow_patterns=["*.safetensors"]))
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                if name in f.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                    return f.get_tensor(name)
    if not required:
        return None
    raise ValueError(f"model {spec.name!r}: none of {list(names)} in {folder}/*.safetensors")


def output_head(llm: Any, model: nn.Module, spec: ModelSpec, vocab_size: int) -> LMHead:
    """The LM head vLLM's pooling runner leaves out, as HF's model class computes it (``LMHead``):
    the tied input embedding, else the checkpoint's ``lm_head.weight``, plus its ``lm_head.bias``
    where it has one, on the model's device and dtype. A head ``LMHead`` cannot reproduce is refused
    (``check_output_head``)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    config = llm.llm_engine.model_config.hf_config
    param = next(model.parameters())
    embed = next((m for m in model.modules() if isinstance(m, VocabParallelEmbedding)), None)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    if tied and embed is not None and embed.weight.is_floating_point():
        weight = embed.weight[:vocab_size]
    elif spec.is_gguf:
        raise ValueError(f"model {spec.name!r}: vllm.mode 'exact' needs the output embedding in floating "
                         "point; convert the GGUF file to a safetensors directory first")
    else:
        weight = checkpoint_tensor(spec, ("lm_head.weight", "model.lm_head.weight"))
        weight = weight[:vocab_size].to(device=param.device, dtype=param.dtype)
    bias = None if spec.is_gguf else checkpoint_tensor(spec, ("lm_head.bias", "model.lm_head.bias"), required=False)
    if bias is not None:
        bias = bias[:vocab_size].to(device=param.device, dtype=param.dtype)
    head = LMHead(weight, bias, config)
    check_output_head(head, config, getattr(model, "logits_processor", None), spec)
    return head


def check_output_head(head: LMHead, config: Any, processor: Any, spec: ModelSpec) -> None:
    """Refuse a model whose logits ``head`` would get wrong: a config key of a head transform we do
    not apply (``UNSUPPORTED_HEAD_KEYS``), or a scale / softcap in vLLM's own logits processor (kept,
    unused, by its pooling runner) other than the one ``head`` takes from the HF config."""
    text = config.get_text_config()
    arch = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
    for key, why in UNSUPPORTED_HEAD_KEYS.items():
        if getattr(text, key, None) is not None:
            raise ValueError(f"model {spec.name!r} ({arch}): backend 'vllm' does not support its output head "
                             f"({why}); use backend: torch, which checks its logits against the model's")
    if processor is None:
        return
    theirs = (float(getattr(processor, "scale", 1.0) or 1.0), getattr(processor, "soft_cap", None))
    ours = (float(head.scale or 1.0), head.softcap)
    scale_ok = abs(theirs[0] - ours[0]) <= 1e-6 * abs(ours[0])
    cap_ok = (theirs[1] is None) == (ours[1] is None) and (ours[1] is None or abs(theirs[1] - ours[1]) <= 1e-6)
    if not (scale_ok and cap_ok):
        raise ValueError(f"model {spec.name!r} ({arch}): vLLM scales its logits by {theirs[0]} with softcap "
                         f"{theirs[1]}, its HF config by {ours[0]} with softcap {ours[1]}; backend 'vllm' does "
                         "not support this output head, use backend: torch")


class LoadedLM:
    """One model inside vLLM, as a per-token pooling model, and the head that makes its logits."""

    def __init__(self, spec: ModelSpec, max_tokens: int, options: VLLMOptions, max_batch_tokens: int) -> None:
        import torch

        self.spec = spec
        self.on_gpu = torch.cuda.is_available()
        self.llm = load_llm(spec, engine_kwargs(spec, max_tokens, options, self.on_gpu, max_batch_tokens, exact=True))
        config = self.llm.llm_engine.model_config
        self.vocab_size, self.hidden_size = config.get_vocab_size(), config.get_hidden_size()
        self.num_layers = config.hf_text_config.num_hidden_layers
        self.dtype = config.dtype
        self.model = self.llm.apply_model(lambda m: m)[0]   # in-process engine core: the live module
        self.device = str(next(self.model.parameters()).device)
        self.head = output_head(self.llm, self.model, spec, self.vocab_size)

    def pool(self, ids: list[list[int]], width: int) -> torch.Tensor:
        """Per-token pooled states of each document, right-padded: [B, T, width]."""
        from torch.nn.utils.rnn import pad_sequence
        from vllm.inputs import TokensPrompt

        outputs = self.llm.encode([TokensPrompt(prompt_token_ids=x) for x in ids],
                                  pooling_task="token_embed", use_tqdm=False)
        states = [out.outputs.data for out in outputs]
        for x, state in zip(ids, states, strict=True):
            if tuple(state.shape) != (len(x), width):
                raise RuntimeError(f"vLLM pooled {tuple(state.shape)} for {len(x)} tokens; expected "
                                   f"({len(x)}, {width})")
        return pad_sequence(states, batch_first=True).to(self.device)


class VLLMEngine(EngineBase):
    """Scores documents on vLLM with every feature of the ``lm`` stage (see the module docstring)."""

    def __init__(self, spec: ModelSpec, *, max_tokens: int = 1024, metrics: tuple[str, ...] = EXACT_METRICS,
                 layers: set[int | str] | None = None, observer: ModelSpec | None = None,
                 options: VLLMOptions | None = None, max_batch_tokens: int | None = None,
                 score_first_token: bool = False, cpu_threads: int | None = None) -> None:
        import torch

        options = options or VLLMOptions()
        vllm_environment(options, cpu_threads)
        on_gpu = torch.cuda.is_available()
        self.spec, self.max_batch_tokens = spec, max_batch_tokens or batch_tokens_default(on_gpu)
        if not on_gpu:
            keep_freed_memory()
            self.trim_after_score = True
        self.tokenizer = load_tokenizer(spec)
        self.encoder = TextEncoder(self.tokenizer, max_tokens, score_first_token)
        self.lm = LoadedLM(spec, max_tokens, options, self.max_batch_tokens)
        check_tokenizer_fits(self.tokenizer, self.lm.vocab_size, spec)
        self.num_layers, self.hidden_size, self.device = self.lm.num_layers, self.lm.hidden_size, self.lm.device
        self.vocab_size, self.dtype = self.lm.vocab_size, self.lm.dtype
        self.taps = HiddenTaps(self.lm.model, self.num_layers)
        self.taps.set_layers({self.resolve_layer(x) for x in layers or ()})
        self.observer = None
        if observer is not None:
            check_same_tokenizer(self.tokenizer, load_tokenizer(observer),
                                 f"observer {observer.name!r} vs performer {spec.name!r}")
            self.observer = LoadedLM(observer, max_tokens, options, self.max_batch_tokens)
            if self.observer.vocab_size != self.lm.vocab_size:
                raise ValueError(f"observer {observer.name!r} has {self.observer.vocab_size} logits, "
                                 f"performer {spec.name!r} {self.lm.vocab_size}: they must match")
        self.metrics_of = LogitMetrics(self.lm.head, self.lm.vocab_size, metrics, self.device,
                                       self.observer.head if self.observer else None)

    @classmethod
    def from_settings(cls, s: EngineSettings) -> VLLMEngine:
        options = s.vllm or VLLMOptions()
        return cls(s.model, max_tokens=s.max_tokens, metrics=s.metrics, layers=s.layers, observer=s.observer,
                   options=options, max_batch_tokens=s.max_batch_tokens, score_first_token=s.score_first_token,
                   cpu_threads=s.cpu_threads)

    def add_taps(self, layers: set[int | str]) -> None:
        wanted = set(self.taps.layers) | {self.resolve_layer(x) for x in layers}
        if wanted - {self.num_layers} != set(self.taps.layers):
            self.taps.set_layers(wanted)

    def _score_batch(self, ids: list[list[int]], heads: list[Head], cache_layers: set[int]) -> list[DocResult]:
        import torch

        with torch.inference_mode():
            width = self.hidden_size
            states = self.lm.pool(ids, width * (len(self.taps.layers) + 1))          # [B,T,H·(k+1)]
            hidden = {layer: states[..., k * width:(k + 1) * width] for k, layer in enumerate(self.taps.layers)}
            last = hidden[self.num_layers] = states[..., -width:]
            obs = self.observer.pool(ids, width) if self.observer is not None else None
            tokens, lengths = pad_tokens(ids, self.device)
            return batch_results(tokens, lengths, last, hidden, obs, self.metrics_of, heads, cache_layers,
                                 self.resolve_layer)
