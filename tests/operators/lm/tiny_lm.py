"""A tiny random Llama (4 blocks, H = 32) with a word-level tokenizer: for wiring tests that need a
real HF model but not real weights (seconds to build)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<unk>", "<s>", "</s>", "the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "is", ".",
         ",", "and", "of", "to", "in"]
TEXT = "the cat sat on the mat . a dog is in the world"
N_LAYERS, HIDDEN = 4, 32


def build_tiny_lm(out: Path, seed: int = 0) -> Path:
    """Save a random 4-block Llama and its tokenizer (no BOS added) to ``out``."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
