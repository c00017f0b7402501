"""Which language model to run and how to load it: a local HF dir, a Hub id, or a GGUF file.

Also the one tokenization every backend shares, so the torch and vLLM engines score the very
same token ids: ``add_special_tokens=False``, then the model's BOS in front when its tokenizer
adds one by default, then truncation to ``max_tokens`` (BOS included).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from operators.base import StrictModel

Backend = Literal["torch", "vllm"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SKIP_EMPTY = "empty or whitespace-only text"
SKIP_SHORT = "fewer than 2 tokens: no position with context"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1234 ünïcödé 日本語 \n\tcode()"


def is_local_path(path: str) -> bool:
    """A path meant as a local file or dir (absolute, relative with ./ or ../, ~, or a .gguf file)."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or Path(path).exists()


class ModelSpec(StrictModel):
    """One causal LM. Its ``name`` prefixes every output column (``<name>__logprob``)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Column prefix.")
    path: str = Field(description="Local HF dir, a .gguf file, or a Hub id such as org/name.")
    backend: Backend = "torch"
    dtype: DType = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: str) -> str:
        if is_local_path(path):
            local = Path(path).expanduser()
            if not local.exists():
                raise ValueError(f"local model path not found: {path}")
            if local.suffix == ".gguf" and not local.is_file():
                raise ValueError(f"GGUF model must be a file: {path}")
        elif not _HUB_ID.match(path):
            raise ValueError(f"not a local path nor a Hub id (org/name): {path!r}")
        return path

    @property
    def is_gguf(self) -> bool:
        return self.path.endswith(".gguf")

    def load_args(self) -> tuple[str, dict[str, Any]]:
        """(name_or_dir, kwargs) for ``from_pretrained``: GGUF loads as ``(dir, gguf_file=name)``."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kwargs["revision"] = self.revision
        if self.is_gguf:
            local = Path(self.path).expanduser()
            return str(local.parent), {**kwargs, "gguf_file": local.name}
        return (str(Path(self.path).expanduser()) if is_local_path(self.path) else self.path), kwargs


def torch_dtype(spec: ModelSpec, device: str) -> Any:
    """The compute dtype: ``auto`` is bfloat16 on CUDA, float32 on CPU."""
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec.dtype)


def pick_device() -> str:
    """``cuda`` when a GPU is visible to this process (e.g. an actor with num_gpus), else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def attn_implementation(device: str) -> str:
    """flash_attention_2 on CUDA when the package is installed, else PyTorch SDPA."""
    if device.startswith("cuda"):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def load_tokenizer(spec: ModelSpec) -> Any:
    """The model's HF (fast) tokenizer."""
    from transformers import AutoTokenizer

    where, kwargs = spec.load_args()
    return AutoTokenizer.from_pretrained(where, **kwargs)


def load_text_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer ``TextEncoder`` needs, at the least cost: a local dir with transformers' generic
    backend is read with ``tokenizers`` alone (``PlainTokenizer``, the same ids and offsets), anything
    else through transformers (``load_tokenizer``)."""
    from operators.lm.plain_tokenizer import PlainTokenizer, plain_tokenizer_json

    local = not spec.is_gguf and not spec.revision and is_local_path(spec.path)
    if local and plain_tokenizer_json(spec.path) is not None:
        return PlainTokenizer(spec.path)
    return load_tokenizer(spec)


def load_causal_lm(spec: ModelSpec, device: str) -> Any:
    """The HF causal LM in eval mode on ``device`` (GGUF weights are dequantized by transformers)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load, per actor, is noise in a pipeline log
    where, kwargs = spec.load_args()
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=torch_dtype(spec, device), attn_implementation=attn_implementation(device), **kwargs)
    return model.to(device).eval()


def model_vocab_size(spec: ModelSpec, tokenizer: Any) -> int:
    """The width of the model's logits, ``config.vocab_size`` (at least ``len(tokenizer)``); the
    tokenizer's size when no config can be read (a GGUF file)."""
    from transformers import AutoConfig

    where, kwargs = spec.load_args()
    try:
        config = AutoConfig.from_pretrained(where, **kwargs).get_text_config()
    except (OSError, ValueError):
        return len(tokenizer)
    return max(int(config.vocab_size), len(tokenizer))


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts one in front by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == bos else None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides the ids: the vocabulary (token -> id), the special tokens and
    whether a BOS is added. Two tokenizers with equal fingerprints give the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(tokenizer.all_special_tokens)
    blob = json.dumps([vocab, special, bos_id(tokenizer)], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_tokenizer(a: Any, b: Any, what: str) -> None:
    """Fail unless both tokenizers have the same vocabulary size and ids on a probe text."""
    size_a, size_b = len(a), len(b)
    ids_a = a(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    ids_b = b(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if size_a != size_b or ids_a != ids_b or bos_id(a) != bos_id(b):
        raise ValueError(f"{what}: tokenizers differ (vocab {size_a} vs {size_b}, probe ids equal: "
                         f"{ids_a == ids_b}, BOS {bos_id(a)} vs {bos_id(b)}); both models must share one "
                         "tokenizer")


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, spec: ModelSpec) -> None:
    """Fail unless every id the tokenizer can emit is a row of the model's embedding/logits.

    A tokenizer copied from another model (a larger vocabulary) would index past the embedding:
    a crash deep in the forward, or garbage logprobs on GPUs. Padding rows (vocab_size larger than
    the tokenizer, as many models have) are fine.
    """
    emitted = len(tokenizer)
    if emitted > vocab_size:
        raise ValueError(f"model {spec.name!r} at {spec.path}: its tokenizer does not match the model: the "
                         f"tokenizer has {emitted} ids but the model only {vocab_size} logits; use the "
                         f"tokenizer saved with these weights")


@dataclass
class Encoded:
    """One document's token ids (BOS included) or why it is skipped."""

    ids: list[int] | None
    truncated: bool | None
    skip_reason: str | None = None

    @property
    def scored(self) -> bool:
        return self.skip_reason is None


def context_id(tokenizer: Any) -> int | None:
    """The token put in front so the first content token is scored too: the BOS the tokenizer adds,
    else its BOS token, else its EOS token (None if it has neither)."""
    added = bos_id(tokenizer)
    if added is not None:
        return added
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


class TextEncoder:
    """Text -> token ids, identical for every backend.

    The ids start with the BOS the tokenizer adds, if any. With ``score_first_token`` a tokenizer
    that adds none gets its BOS, else EOS, in front (``context_id``): every content token then has
    context and is scored, whatever the tokenizer's BOS policy (PreSelect compares losses of model
    families whose tokenizers differ in that policy).
    """

    def __init__(self, tokenizer: Any, max_tokens: int, score_first_token: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.bos = context_id(tokenizer) if score_first_token else bos_id(tokenizer)
        # Long texts are cut before tokenizing: no token spans 64 characters in practice, so the
        # first max_tokens ids of the cut text are those of the full text.
        self.char_cap = 64 * max_tokens + 4096

    def encode(self, texts: list[str | None]) -> list[Encoded]:
        """Encode a batch; empty / whitespace-only and 1-token documents get a skip reason."""
        out: list[Encoded] = [Encoded(None, None, SKIP_EMPTY)] * len(texts)
        live = [i for i, t in enumerate(texts) if t and not t.isspace()]
        budget = self.max_tokens - (self.bos is not None)
        cut = [texts[i][: self.char_cap] for i in live]  # type: ignore[index]
        ids = self.tokenizer(cut, add_special_tokens=False)["input_ids"] if live else []
        for i, row in zip(live, ids, strict=True):
            truncated = len(row) > budget
            if not truncated and len(texts[i]) > self.char_cap:  # type: ignore[arg-type]
                row = self.tokenizer(texts[i], add_special_tokens=False)["input_ids"]
                truncated = len(row) > budget
            row = ([self.bos] if self.bos is not None else []) + row[:budget]
            out[i] = Encoded(row, truncated, None if len(row) >= 2 else SKIP_SHORT)
        return out

    def scored_text(self, text: str) -> str:
        """The part of ``text`` that ``encode`` keeps: all of it, or for a cut document the prefix up
        to the end of the last kept token (its character offset; a slow tokenizer, which has no
        offsets, decodes the kept ids instead). zlib compresses exactly this span."""
        budget = self.max_tokens - (self.bos is not None)
        try:
            enc = self.tokenizer(text[: self.char_cap], add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) <= budget and len(text) > self.char_cap:
                enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow (Python) tokenizers have no offsets
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= budget else self.tokenizer.decode(ids[:budget])
        if len(enc["input_ids"]) <= budget:
            return text
        return text[: enc["offset_mapping"][budget - 1][1]]
