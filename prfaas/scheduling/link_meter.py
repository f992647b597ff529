"""What the cross-datacenter link delivers, measured from the transfers themselves.

The short-term controller needs the link's capacity now, not the one it was configured with: after
a cut the PrfaaS egress falls with the link, and against the configured rate a saturated link reads
as an idle one. Nor do the senders' own byte counters say it (their writes land in socket and
proxy buffers long before the far side has them). What does say it is each PrfaaS transfer's
outcome, which the prefill node reports when the decode node has acknowledged every chunk:
`kv_bytes` delivered over `transfer_s`, and `drain_s`, the part of it after the compute ended
(`prefill_s`). KV streams layer by layer while the prefill runs, so on a link with room the last
acknowledgement follows the compute by about a round trip; a transfer whose drain is longer (over
`tail_fraction` of its compute and over `min_tail_s`) waited for the link. (Measured in an emulated
cut to a tenth: drains of 0.5-1.5 s behind 3-7 s of compute, against ~0 before the cut.)

Over a sliding window of completed transfers (the last `window_s`, stretched back to hold the last
`min_transfers` of them while they are under `max_age_s` old: a deep cut makes each transfer last
seconds, and a window of one or two completions flipped between "saturated" and "idle" every few
seconds in an emulated cut to 5%, so the threshold swung between the plan's and four times it):
- `link_bound`: most of those of the last `window_s` (all of them when fewer than `min_bound`
  completed in it) waited for the link, and at least `min_bound` did;
- the busy rate: their bytes over the time at least one of them was in flight (the union of their
  [end - transfer_s, end] intervals); from three completions on, the bytes of those after the
  first over the busy time from the first completion to the last (`_rate`). While the link is the
  bottleneck it is busy whenever a transfer is in flight, so this is its capacity; otherwise it
  only bounds the capacity from below.
`capacity()` is the busy rate while link-bound (never above the configured rate); otherwise it
moves back toward the configured rate by `relax` of the gap each reading (and never below the busy
rate). A window with no transfer keeps the last estimate: no news is not a restored link.
Plain Python, no I/O; the router's control loop reads it once a tick.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkReading:
    capacity_bytes_per_s: float  # the estimate
    busy_rate_bytes_per_s: float  # bytes over busy time in the window (0: no transfer in it)
    link_bound: bool
    transfers: int  # in the window
    bound: int  # of them, those that waited for the link


class LinkMeter:
    def __init__(
        self,
        configured_bytes_per_s: float,
        window_s: float = 10.0,
        tail_fraction: float = 0.1,
        min_tail_s: float = 0.1,
        min_bound: int = 2,
        relax: float = 0.5,
        min_transfers: int = 6,
        max_age_s: float = 60.0,
    ) -> None:
        if configured_bytes_per_s <= 0:
            raise ValueError(f"the configured link rate must be > 0 bytes/s, got {configured_bytes_per_s}")
        self.configured = configured_bytes_per_s
        self.window_s, self.tail_fraction, self.min_tail_s = window_s, tail_fraction, min_tail_s
        self.min_bound, self.relax = min_bound, relax
        self.min_transfers, self.max_age_s = min_transfers, max(max_age_s, window_s)
        self.estimate = configured_bytes_per_s
        self._done: deque[tuple[float, float, int, bool]] = deque()  # (end, transfer_s, bytes, bound)

    def record(self, now: float, kv_bytes: int, prefill_s: float, transfer_s: float, drain_s: float) -> None:
        """One transfer across the link, acknowledged at `now`. The figures come from a prefill node
        over the network: one that is not finite, or out of range, is dropped (never an estimate)."""
        figures = (kv_bytes, prefill_s, transfer_s, drain_s)
        if not all(math.isfinite(x) for x in figures) or kv_bytes <= 0 or transfer_s <= 0:
            return
        if prefill_s < 0 or drain_s < 0:
            return
        bound = drain_s > max(self.min_tail_s, self.tail_fraction * max(prefill_s, 0.0))
        self._done.append((now, transfer_s, kv_bytes, bound))

    def read(self, now: float) -> LinkReading:
        while self._done and (self._done[0][0] < now - self.max_age_s or (
                self._done[0][0] < now - self.window_s and len(self._done) > self.min_transfers)):
            self._done.popleft()
        done = list(self._done)
        if not done:
            return LinkReading(self.estimate, 0.0, False, 0, 0)
        recent = [d for d in done if d[0] >= now - self.window_s]
        judged = recent if len(recent) >= self.min_bound else done   # bound or not: the latest say
        bound = sum(b for *_, b in judged)
        rate = _rate(done)
        link_bound = bound >= self.min_bound and 2 * bound > len(judged)
        if link_bound:
            self.estimate = min(rate, self.configured)
        else:
            relaxed = self.estimate + (self.configured - self.estimate) * self.relax
            self.estimate = max(relaxed, min(rate, self.configured))
        return LinkReading(self.estimate, rate, link_bound, len(done), bound)


def _rate(done: list[tuple[float, float, int, bool]]) -> float:
    """Bytes over busy time. From three completions on, the departures' rate: the bytes of those
    after the first over the busy time between the first completion and the last. Transfers that
    share a cut link each last several times their own share, so the union of their spans reaches
    far back beyond the completions counted, and bytes over it read half the capacity of a link four
    transfers shared; a busy link's completions carry its capacity, whatever the sharing."""
    if len(done) < 3:
        return sum(n for _, _, n, _ in done) / _busy_s(done, float("-inf"), float("inf"))
    first, last = min(end for end, *_ in done), max(end for end, *_ in done)
    if last == first:
        return sum(n for _, _, n, _ in done) / _busy_s(done, float("-inf"), float("inf"))
    return sum(n for end, _, n, _ in done if end > first) / _busy_s(done, first, last)


def _busy_s(done: list[tuple[float, float, int, bool]], since: float, until: float) -> float:
    """The length of the union of the transfers' [end - transfer_s, end] intervals, within [since, until]."""
    spans = sorted((max(end - s, since), min(end, until)) for end, s, _, _ in done)
    spans = [(a, b) for a, b in spans if b > a]
    if not spans:
        return 1e-9
    total, start, stop = 0.0, spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > stop:
            total += stop - start
            start, stop = a, b
        else:
            stop = max(stop, b)
    return max(total + stop - start, 1e-9)
