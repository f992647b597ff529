"""Mooncake request traces: load, slice, scale, turn into token ids, and the trace's own reuse bound.

The format (Mooncake, FAST'25) is one JSON object a line: `timestamp` (ms from the trace start),
`input_length` and `output_length` (tokens) and `hash_ids`, one id per 512-token block of the prompt
(the last block may be partial). The ids are chained: equal ids at the same position are the same
block and name the whole prefix that ends with it. No text or token ids are in the file.

- Slice (`read_trace`): a time window `[start_s, end_s)` on the trace's own clock, then the first N
  requests of it. Arrival times are counted from the window's start (0 without a window).
- Scale (`Scaling`): lengths and the block size are divided by `length_factor` (a divisor of 512, so
  the block size stays whole), rounding lengths up: a prompt keeps exactly its number of blocks and
  every full block stays full. Output lengths are divided the same way, at least 1 token. Time is
  multiplied by `time_factor` (2.0: the same requests over twice the time, at half the rate).
- Tokens (`TokenSpace`): block `i` with id `h` of a prompt is `block_tokens` ids drawn from the
  vocabulary minus the excluded (special, eos) ids by blake2b of (seed, h, i): the same id at the
  same position gives the same tokens in every request, process and Python version, different ones
  differ. A partial last block of `n` tokens is the first `n` tokens of its full block.
- Reuse bound (`reuse_bound`): the fraction of prompt tokens whose block was seen before in arrival
  order with an unbounded cache, starting cold at the slice's first request. Blocks are keyed by
  their chain (position and every id before it), so a hit is always a prefix, as in a real prefix
  cache; for a chained trace this is the same count as "the id was seen before". A block seen before
  with fewer tokens (a partial tail) counts the tokens seen. `full_block_fraction` counts only full
  blocks, which is all a block-granular cache (ours) can hit.
Plain Python, no torch, no I/O beyond reading the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TRACE_BLOCK_TOKENS = 512


class TraceError(ValueError):
    """A trace file or a slice of it that cannot be used, with the line that says why."""


@dataclass(frozen=True)
class TraceRecord:
    """One line of the file, as written (trace units)."""

    line: int                       # 1-based line number in the file
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _int_field(obj: Mapping, key: str, where: str, minimum: int) -> int:
    if key not in obj:
        raise TraceError(f"{where}: missing {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"{where}: {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise TraceError(f"{where}: {key!r} must be >= {minimum}, got {value}")
    return value


def parse_record(text: str, line: int, where: str = "trace") -> TraceRecord:
    loc = f"{where}:{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(f"{loc}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
    ts = _int_field(obj, "timestamp", loc, 0)
    n_in = _int_field(obj, "input_length", loc, 1)
    n_out = _int_field(obj, "output_length", loc, 0)
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
        raise TraceError(f"{loc}: 'hash_ids' must be a list of integers")
    want = math.ceil(n_in / TRACE_BLOCK_TOKENS)
    if len(ids) != want:
        raise TraceError(f"{loc}: {len(ids)} hash_ids for input_length {n_in}; "
                         f"{TRACE_BLOCK_TOKENS}-token blocks need {want}")
    return TraceRecord(line, ts, n_in, n_out, tuple(ids))


def read_trace(path: str | Path, first: int | None = None,
               window: tuple[float, float] | None = None) -> list[TraceRecord]:
    """The records of `path` in `window` (seconds on the trace clock, end excluded), then the first
    `first` of them. Timestamps must not decrease."""
    if first is not None and first <= 0:
        raise TraceError(f"first must be a positive number of requests, got {first}")
    if window is not None and not (0 <= window[0] < window[1]):
        raise TraceError(f"window must be 0 <= start < end seconds, got {window}")
    path = Path(path)
    lo, hi = (window[0] * 1000, window[1] * 1000) if window else (0.0, math.inf)
    out: list[TraceRecord] = []
    last_ts = -1
    with path.open() as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            rec = parse_record(text, n, str(path))
            if rec.timestamp_ms < last_ts:
                raise TraceError(f"{path}:{n}: timestamp {rec.timestamp_ms} before the previous {last_ts}")
            last_ts = rec.timestamp_ms
            if rec.timestamp_ms >= hi or (first is not None and len(out) == first):
                break
            if rec.timestamp_ms >= lo:
                out.append(rec)
    if not out:
        raise TraceError(f"{path}: no request in the slice (window {window}, first {first})")
    return out


@dataclass(frozen=True)
class Scaling:
    length_factor: int = 1        # lengths and the block size are divided by it
    time_factor: float = 1.0      # times are multiplied by it

    def __post_init__(self) -> None:
        f = self.length_factor
        if isinstance(f, bool) or not isinstance(f, int) or f <= 0 or TRACE_BLOCK_TOKENS % f:
            raise TraceError(f"length_factor must be a positive divisor of {TRACE_BLOCK_TOKENS}, got {f!r}")
        if not (math.isfinite(self.time_factor) and self.time_factor > 0):
            raise TraceError(f"time_factor must be a positive number, got {self.time_factor!r}")

    @property
    def block_tokens(self) -> int:
        return TRACE_BLOCK_TOKENS // self.length_factor

    def length(self, tokens: int) -> int:
        return -(-tokens // self.length_factor)

    def output(self, tokens: int) -> int:
        return max(1, self.length(tokens))

    def seconds(self, ms: float) -> float:
        return ms / 1000.0 * self.time_factor


@dataclass(frozen=True)
class TraceRequest:
    """One request after scaling; `index` is its position in the slice."""

    index: int
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    block_tokens: int

    def block_sizes(self) -> list[int]:
        bt, n = self.block_tokens, self.input_length
        return [min(bt, n - i * bt) for i in range(len(self.hash_ids))]


class Replayed(NamedTuple):
    arrival_s: float
    token_ids: list[int]
    output_length: int


@dataclass(frozen=True)
class TokenSpace:
    """The ids a synthetic prompt may use: `[0, vocab_size)` minus `exclude`."""

    vocab_size: int
    exclude: frozenset[int] = frozenset()
    seed: int = 0
    _allowed: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _cache: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise TraceError(f"vocab_size must be at least 2, got {self.vocab_size}")
        outside = sorted(i for i in self.exclude if not 0 <= i < self.vocab_size)
        if outside:
            raise TraceError(f"excluded ids {outside} are outside the vocabulary [0, {self.vocab_size})")
        allowed = tuple(i for i in range(self.vocab_size) if i not in self.exclude)
        if len(allowed) < 2:
            raise TraceError("fewer than 2 token ids left after the exclusions")
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_cache", {})

    @classmethod
    def from_model_config(cls, config: Mapping, seed: int = 0) -> TokenSpace:
        """From a Hugging Face config.json mapping: its vocabulary minus bos, eos and pad ids."""
        special: set[int] = set()
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = config.get(key)
            special |= set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
        return cls(int(config["vocab_size"]), frozenset(special), seed)

    def block(self, hash_id: int, position: int, block_tokens: int) -> tuple[int, ...]:
        """The full block `position` of id `hash_id`: deterministic, `block_tokens` ids."""
        key = (hash_id, position, block_tokens)
        got = self._cache.get(key)
        if got is None:
            ids, n = self._allowed, len(self._allowed)
            out: list[int] = []
            stem = f"prfaas-trace/{self.seed}/{hash_id}/{position}/".encode()
            counter = 0
            while len(out) < block_tokens:
                digest = hashlib.blake2b(stem + str(counter).encode(), digest_size=64).digest()
                out.extend(ids[w % n] for w in struct.unpack("<8Q", digest))
                counter += 1
            got = tuple(out[:block_tokens])
            if len(self._cache) >= 1 << 16:
                self._cache.clear()
            self._cache[key] = got
        return got

    def prompt(self, req: TraceRequest) -> list[int]:
        out: list[int] = []
        for i, (h, size) in enumerate(zip(req.hash_ids, req.block_sizes(), strict=True)):
            out.extend(self.block(h, i, req.block_tokens)[:size])
        return out


@dataclass(frozen=True)
class ReuseBound:
    requests: int
    prompt_tokens: int
    reusable_tokens: int             # tokens whose block (prefix) was seen before
    reusable_full_block_tokens: int  # of them, tokens in full blocks

    @property
    def fraction(self) -> float:
        return self.reusable_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def full_block_fraction(self) -> float:
        return self.reusable_full_block_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "reusable_tokens": self.reusable_tokens, "fraction": self.fraction,
                "reusable_full_block_tokens": self.reusable_full_block_tokens,
                "full_block_fraction": self.full_block_fraction}


def chain_keys(requests: Iterable[TraceRequest]) -> list[tuple[int, ...]]:
    """Per request, one small int per block naming the block and every block before it (interned
    in arrival order): equal keys are equal prefixes, whatever the file's ids mean."""
    intern: dict[tuple[int, int], int] = {}
    out = []
    for req in requests:
        parent, keys = 0, []
        for h in req.hash_ids:
            parent = intern.setdefault((parent, h), len(intern) + 1)
            keys.append(parent)
        out.append(tuple(keys))
    return out


def reusable_per_request(requests: Sequence[TraceRequest]) -> list[tuple[int, int]]:
    """(reusable tokens, of them in full blocks) per request, with a cold unbounded cache."""
    seen: dict[int, int] = {}       # chain key -> most tokens of that block seen
    out = []
    for req, keys in zip(requests, chain_keys(requests), strict=True):
        sizes = req.block_sizes()
        hit = full = 0
        for key, size in zip(keys, sizes, strict=True):
            before = seen.get(key, 0)
            if before == 0:
                break
            hit += min(size, before)
            full += size if size == req.block_tokens and before >= size else 0
        for key, size in zip(keys, sizes, strict=True):
            seen[key] = max(seen.get(key, 0), size)
        out.append((hit, full))
    return out


def reuse_bound(requests: Sequence[TraceRequest]) -> ReuseBound:
    per = reusable_per_request(requests)
    return ReuseBound(len(requests), sum(r.input_length for r in requests),
                      sum(h for h, _ in per), sum(f for _, f in per))


@dataclass(frozen=True)
class Trace:
    """A slice of a trace file, scaled. `requests` are in scaled units; `original` the same
    requests in the file's units (lengths, 512-token blocks, times unstretched)."""

    source: str
    scaling: Scaling
    requests: tuple[TraceRequest, ...]
    original: tuple[TraceRequest, ...]

    @classmethod
    def load(cls, path: str | Path, scaling: Scaling | None = None, first: int | None = None,
             window: tuple[float, float] | None = None) -> Trace:
        scaling = scaling or Scaling()
        records = read_trace(path, first, window)
        t0 = window[0] * 1000 if window else 0.0
        return cls(str(path), scaling, _requests(records, scaling, t0), _requests(records, Scaling(), t0))

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s

    def reuse_bound(self, scaled: bool = True) -> ReuseBound:
        return reuse_bound(self.requests if scaled else self.original)

    def replay(self, tokens: TokenSpace) -> Iterator[Replayed]:
        """(arrival time in s from the slice start, prompt token ids, output length) per request,
        in arrival order, in scaled units."""
        for req in self.requests:
            yield Replayed(req.arrival_s, tokens.prompt(req), req.output_length)


def _requests(records: Sequence[TraceRecord], s: Scaling, t0_ms: float) -> tuple[TraceRequest, ...]:
    return tuple(TraceRequest(i, s.seconds(r.timestamp_ms - t0_ms), s.length(r.input_length),
                              s.output(r.output_length), r.hash_ids, s.block_tokens)
                 for i, r in enumerate(records))
