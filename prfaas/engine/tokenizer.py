"""Tokenizers of a model directory, and incremental detokenisation for streamed text.

What `load_tokenizer` picks, in order (torch-free; the router and the front door load it too):
- `tokenizer.json`: Hugging Face `tokenizers` (`HfTokenizer`);
- `tiktoken.model`: a tiktoken BPE (`TiktokenTokenizer`, as Kimi-Linear ships it, with its special
  tokens from `tokenizer_config.json`);
- no tokenizer file at all: the byte-level fallback (`ByteTokenizer`), logged: each UTF-8 byte is its
  own id (0..255); ids the model has beyond that (bos/eos/pad of the built-in presets) decode to
  nothing.
A directory that ships some other tokenizer (`tokenizer.model`, `vocab.json`, a `tokenizer_config.json`
without a file we read), or one whose tokenizer fails to load, is a `TokenizerError`: never a silent
fallback to bytes.

`encode(text, add_special_tokens=False)` parses special tokens written in the text (as a chat
template renders them); `add_special_tokens=True` also applies the tokenizer's post-processor
(a BOS, where the tokenizer adds one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from prfaas.obs.log import get_logger

log = get_logger(__name__)

# files that mean "this directory ships a tokenizer" (so the byte fallback would be wrong)
_TOKENIZER_FILES = ("tokenizer.json", "tiktoken.model", "tokenizer.model", "vocab.json", "tokenizer_config.json")

# Kimi's pre-tokeniser (its tokenization_kimi.py): Han runs, cased words with their contractions,
# numbers of up to three digits, punctuation runs, newlines and other whitespace
KIMI_PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
KIMI_RESERVED_SPECIAL = 256  # ids past the BPE ranks reserved for special tokens


class TokenizerError(Exception):
    """A model directory's tokenizer cannot be loaded."""


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"the byte tokenizer needs a vocabulary of at least 256 ids, the model has {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HfTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


class TiktokenTokenizer:
    """A tiktoken BPE (`tiktoken.model`: base64 token, rank per line) with the special tokens named in
    `tokenizer_config.json`'s `added_tokens_decoder`; the other reserved ids past the ranks are
    `<|reserved_token_N|>`, as Kimi's own tokenizer names them."""

    def __init__(self, model_file: Path, tokenizer_config: dict[str, Any], pat_str: str = KIMI_PAT_STR) -> None:
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError as e:
            raise TokenizerError(f"{model_file}: reading a tiktoken.model needs the tiktoken package ({e})") from e
        ranks = load_tiktoken_bpe(str(model_file))
        base = len(ranks)
        named = {int(i): _content(t) for i, t in (tokenizer_config.get("added_tokens_decoder") or {}).items()}
        reserved = max([base + KIMI_RESERVED_SPECIAL - 1, *named]) + 1
        special = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, reserved)}
        self._special_ids = frozenset(special.values())
        self._enc = tiktoken.Encoding(model_file.name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)
        self.vocab_size = reserved

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._enc.encode(text, allowed_special="all"))

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in self._special_ids]
        return str(self._enc.decode(kept, errors="replace"))


def _content(token: Any) -> str:
    """An AddedToken as tokenizer_config.json writes it: a string or {"content": ...}."""
    return str(token["content"] if isinstance(token, dict) else token)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model directory; a clear error when it is not one."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read it: {e}") from e
    if not isinstance(raw, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def special_tokens(model_dir: str | Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings from tokenizer_config.json (what a chat template sees)."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    cfg = read_json(path)
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
    return {n: _content(cfg[n]) for n in names if cfg.get(n) is not None}


def load_tokenizer(model_dir: str | Path, vocab_size: int) -> Tokenizer:
    d = Path(model_dir)
    try:
        if (d / "tokenizer.json").is_file():
            return HfTokenizer(d / "tokenizer.json")
        if (d / "tiktoken.model").is_file():
            config = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
            return TiktokenTokenizer(d / "tiktoken.model", config)
    except TokenizerError:
        raise
    except Exception as e:  # tokenizers and tiktoken raise their own types: say which file failed
        raise TokenizerError(f"{d}: the model's tokenizer failed to load: {type(e).__name__}: {e}") from e
    shipped = [f for f in _TOKENIZER_FILES if (d / f).exists()]
    if shipped:
        raise TokenizerError(
            f"{d}: ships {', '.join(shipped)} but no tokenizer this build reads "
            "(tokenizer.json, or tiktoken.model with tokenizer_config.json)"
        )
    log.warning("byte_tokenizer", model_dir=str(d), reason="the directory ships no tokenizer")
    return ByteTokenizer(vocab_size)


class IncrementalDetokenizer:
    """Text of a token stream, piece by piece, that never splits a character: a multi-byte
    character whose bytes arrive in different messages is emitted once, whole.

    Decodes a short window (the tokens since the last emitted piece plus the few before it, for
    tokenizers whose decoding depends on the previous token, such as a leading-space marker) and
    holds back text that ends in an incomplete character (U+FFFD) until more tokens complete it.
    `finish()` emits whatever is still held back (with U+FFFD where the stream really ended inside a
    character)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens before this are emitted

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        window = self.ids[self._prefix :]
        if not window:
            return ""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(window)
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]

    def finish(self) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(before) :]
