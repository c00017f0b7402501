"""A model's ``tokenizer.json`` read with the ``tokenizers`` library, where transformers reads it unchanged.

transformers' generic fast backend (``tokenizer_class: TokenizersBackend`` in ``tokenizer_config.json``)
loads ``tokenizer.json`` as it is, with the special tokens the config names. Reading the same file
with ``tokenizers`` gives the same ids and offsets without transformers' import (3-4 s of CPU on a
2-core machine, in the run's head where the lm stage loads its model). A model-specific tokenizer
class may rewrite the pipeline, so any other directory goes through transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plain_tokenizer_json(path: str) -> Path | None:
    """``<dir>/tokenizer.json`` of a local tokenizer dir whose config names transformers' generic
    backend (``tokenizer_class: TokenizersBackend``): transformers loads that file unchanged, so it
    is the same tokenizer. None for any other dir (a model-specific class may rewrite the pipeline)."""
    local = Path(path).expanduser()
    config, file = local / "tokenizer_config.json", local / "tokenizer.json"
    if not (config.is_file() and file.is_file()):
        return None
    try:
        generic = json.loads(config.read_text()).get("tokenizer_class") == "TokenizersBackend"
    except (OSError, ValueError):
        return None
    return file if generic else None


#: transformers' named special tokens (``SPECIAL_TOKENS_ATTRIBUTES``), each ``<kind>_token`` in the config
SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _content(token: str | dict | None) -> str | None:
    """A special token as the config stores it: a string, or an ``AddedToken`` dict's content."""
    return token.get("content") if isinstance(token, dict) else token


class PlainTokenizer:
    """The part of a transformers fast tokenizer that ``TextEncoder`` and ``tokenizer_fingerprint``
    call, over ``tokenizers``: ``tok(texts, add_special_tokens=..., return_offsets_mapping=...)``,
    ``bos_token_id`` / ``eos_token_id`` (the config's ``bos_token`` / ``eos_token``), ``get_vocab`` and
    ``all_special_tokens``."""

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer

        file = plain_tokenizer_json(directory)
        if file is None:
            raise ValueError(f"{directory}: not a tokenizer dir with transformers' generic backend "
                             "(tokenizer_class: TokenizersBackend); load it with transformers")
        self.tok = Tokenizer.from_file(str(file))
        config = json.loads((file.parent / "tokenizer_config.json").read_text())
        self.bos_token_id = self._special_id(config.get("bos_token"))
        self.eos_token_id = self._special_id(config.get("eos_token"))
        named = [_content(config.get(f"{kind}_token")) for kind in SPECIAL_KINDS]
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        #: the config's named special tokens, then its extra ones, once each (transformers' order)
        self.all_special_tokens = list(dict.fromkeys(t for t in [*named, *map(_content, extra)] if t is not None))

    def _special_id(self, token: str | dict | None) -> int | None:
        content = _content(token)
        return None if content is None else self.tok.token_to_id(content)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self.tok.get_vocab(with_added_tokens=True)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else text
        encoded = self.tok.encode_batch(texts, add_special_tokens=add_special_tokens) if texts else []
        out: dict[str, Any] = {"input_ids": [e.ids for e in encoded]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encoded]
        return {k: v[0] for k, v in out.items()} if isinstance(text, str) else out
