"""A tiny random Llama (4 blocks, H = 32) with a word-level tokenizer: for wiring tests that need a
real HF model but not real weights (seconds to build)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<unk>", "<s>", "</s>", "the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "is", ".",
         ",", "and", "of", "to", "in"]
TEXT = "the cat sat on the mat . a dog is in the world"
N_LAYERS, HIDDEN = 4, 32


def build_tiny_lm(out: Path, seed: int = 0, bos: bool = False) -> Path:
    """Save a random 4-block Llama (32 logits) and its tokenizer (19 ids; <s> = 1 in front only with
    ``bos``) to ``out``."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_tiny_head_model(kind: str, out: Path, seed: int = 0) -> Path:
    """A random 2-block model of an architecture whose output head is more than a matmul, with the
    word-level tokenizer: ``gptj`` and ``phi`` (an ``lm_head`` with a bias, set to N(0, 1) so it
    shows), ``granite`` (logits divided by ``logits_scaling`` = 4)."""
    from transformers import AutoModelForCausalLM, GPTJConfig, GraniteConfig, PhiConfig

    build_tiny_lm(out, seed)  # its tokenizer; the Llama weights are replaced
    for old in out.glob("*.safetensors"):
        old.unlink()
    common = {"vocab_size": 32, "bos_token_id": 1, "eos_token_id": 2}
    configs = {
        "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, max_position_embeddings=128, **common),
        "gptj": lambda: GPTJConfig(n_embd=64, n_layer=2, n_head=2, rotary_dim=16, n_positions=128, **common),
        "phi": lambda: PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 partial_rotary_factor=0.5, max_position_embeddings=128, **common),
        "granite": lambda: GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0,
                                         embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                                         tie_word_embeddings=False, max_position_embeddings=128, **common),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[kind]())
    bias = getattr(model.get_output_embeddings(), "bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.normal_(0.0, 1.0)
    model.save_pretrained(out)
    return out


def vllm_head_logits(paths: list[str], ids: list[int]) -> list:
    """Each model's logits [T, V] of ``ids`` from the vLLM engine (its head over vLLM's pooled
    states); run it in a fresh process (a Ray task with max_calls=1): vLLM binds its process."""
    from operators.lm.models import ModelSpec
    from operators.lm.vllm_engine import VLLMEngine

    out, engines = [], []  # engines stay alive: freeing one tears down vLLM's process-wide state
    for path in paths:
        engines.append(VLLMEngine(ModelSpec(name="t", path=path, backend="vllm"), max_tokens=32, cpu_threads=1))
        lm = engines[-1].lm
        with torch.inference_mode():
            out.append(lm.head(lm.pool([ids], lm.hidden_size)[0]).float().numpy())
    return out


def vllm_tap_storage(path: str, ids: list[int], layers: set[int]) -> dict[int, bool]:
    """Per tapped layer: whether the vLLM engine's captured tap shares storage with a tensor a decoder
    block received or returned in the same forward (what the model may still update in place).
    Checked at the end of the last block, before the taps are concatenated. Run in a fresh process."""
    from operators.lm.models import ModelSpec
    from operators.lm.vllm_engine import VLLMEngine

    engine = VLLMEngine(ModelSpec(name="t", path=path, backend="vllm"), max_tokens=32, layers=layers, cpu_threads=1)
    seen: set[int] = set()
    shared: dict[int, bool] = {}

    def record(*values: object) -> None:
        for value in values:
            if isinstance(value, torch.Tensor):
                seen.add(value.untyped_storage().data_ptr())
            elif isinstance(value, tuple | list):
                record(*value)
            elif isinstance(value, dict):
                record(*value.values())

    blocks = engine.taps.blocks
    for block in blocks:
        block.register_forward_pre_hook(lambda _m, args, kwargs: record(args, kwargs), with_kwargs=True)
        block.register_forward_hook(lambda _m, _args, output: record(output))
    blocks[-1].register_forward_hook(lambda _m, _a, _o: shared.update(
        {layer: t.untyped_storage().data_ptr() in seen for layer, t in engine.taps._captured.items()}))
    with torch.inference_mode():
        engine.lm.pool([ids], engine.hidden_size * (len(engine.taps.layers) + 1))
    return shared
