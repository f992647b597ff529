"""Per-link statistics of the KV stream: bytes sent and acknowledged, in one-second buckets, so
the threshold controller can read the egress rate and Prometheus can export the totals.

A link is a destination address. Senders record; readers call `rate()` or `snapshot()`. Plain
Python, no I/O; the clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LinkCounters:
    bytes_sent: int = 0
    bytes_acked: int = 0
    chunks_sent: int = 0
    transfers: int = 0
    failures: int = 0
    retransmits: int = 0    # TCP segments retransmitted on this link's KV connections
    sent_buckets: deque[tuple[int, int]] = field(default_factory=deque)   # (second, bytes)
    acked_buckets: deque[tuple[int, int]] = field(default_factory=deque)


class LinkStats:
    def __init__(self, window_s: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.links: dict[str, LinkCounters] = {}

    def _link(self, link: str) -> LinkCounters:
        return self.links.setdefault(link, LinkCounters())

    def _add(self, buckets: deque[tuple[int, int]], n: int) -> None:
        now = int(self.clock())
        if buckets and buckets[-1][0] == now:
            buckets[-1] = (now, buckets[-1][1] + n)
        else:
            buckets.append((now, n))
        while buckets and buckets[0][0] <= now - self.window_s:
            buckets.popleft()

    def record_sent(self, link: str, nbytes: int) -> None:
        c = self._link(link)
        c.bytes_sent += nbytes
        c.chunks_sent += 1
        self._add(c.sent_buckets, nbytes)

    def record_acked(self, link: str, nbytes: int) -> None:
        c = self._link(link)
        c.bytes_acked += nbytes
        self._add(c.acked_buckets, nbytes)

    def record_retransmits(self, link: str, segments: int) -> None:
        self._link(link).retransmits += segments

    @property
    def total_retransmits(self) -> int:
        return sum(c.retransmits for c in self.links.values())

    def record_transfer(self, link: str, ok: bool) -> None:
        c = self._link(link)
        c.transfers += 1
        c.failures += 0 if ok else 1

    def rate(self, link: str | None = None, window_s: int | None = None, acked: bool = False) -> float:
        """Bytes per second over the last `window_s` whole seconds (all links when None)."""
        w = min(window_s or self.window_s, self.window_s)
        now = int(self.clock())
        total = 0
        for name, c in self.links.items():
            if link is None or name == link:
                buckets = c.acked_buckets if acked else c.sent_buckets
                total += sum(n for sec, n in buckets if now - w <= sec < now)
        return total / w

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "bytes_sent": c.bytes_sent,
                "bytes_acked": c.bytes_acked,
                "chunks_sent": c.chunks_sent,
                "transfers": c.transfers,
                "failures": c.failures,
                "egress_bytes_per_s": self.rate(name),
            }
            for name, c in self.links.items()
        }


GLOBAL = LinkStats()
