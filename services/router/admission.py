"""The router's admission queue: requests wait here, in arrival order, until a prefill node and a
decode node can take them. Plain Python, no I/O: the router's dispatcher drives it.

Rules:
  - Bounded by count and by prompt tokens; past either bound `push` raises `Overloaded`
    (RESOURCE_EXHAUSTED with a retry hint).
  - FIFO, with backfill: `dispatch` offers each waiting request, oldest first, to `try_route`,
    which reserves capacity and returns a placement, or None when the request does not fit now.
    A request that does not fit is skipped and younger ones may go ahead of it (one huge request
    does not block small ones) until it has waited `max_head_wait_s` at the head; then nothing
    younger goes ahead of it, so it cannot starve.
  - A retried request goes back to the front (it has already waited its turn).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prfaas.errors import Code, PrfaasError

P = TypeVar("P")  # a placement: what try_route returns for a request that fits


class Overloaded(PrfaasError):
    """The queue is full; `retry_after_ms` is the router's guess of when to try again."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass(eq=False)
class Waiting(Generic[P]):
    request_id: str
    prompt_tokens: int
    enqueued_at: float
    ask: Any = None  # what the router needs to place it
    placed: asyncio.Future[P] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    head_since: float | None = None  # when it first became the oldest waiting request


class AdmissionQueue(Generic[P]):
    def __init__(
        self,
        max_waiting: int = 1024,
        max_waiting_tokens: int = 1 << 22,
        max_head_wait_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_waiting, self.max_waiting_tokens = max_waiting, max_waiting_tokens
        self.max_head_wait_s, self.clock = max_head_wait_s, clock
        self._queue: deque[Waiting[P]] = deque()
        self.waiting_tokens = 0
        self._dispatched = deque[float](maxlen=64)  # recent dispatch times, for the retry hint

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Waiting[P]]:
        """The waiting requests, oldest first (a snapshot)."""
        return iter(list(self._queue))

    def push(self, request_id: str, prompt_tokens: int, ask: Any = None, front: bool = False) -> Waiting[P]:
        if not front and (len(self._queue) >= self.max_waiting
                          or self.waiting_tokens + prompt_tokens > self.max_waiting_tokens):
            raise Overloaded(
                f"the router's queue is full ({len(self._queue)} requests, {self.waiting_tokens} prompt tokens "
                f"waiting; bounds {self.max_waiting} and {self.max_waiting_tokens}): retry later",
                self.retry_after_ms(),
            )
        w: Waiting[P] = Waiting(request_id, prompt_tokens, self.clock(), ask)
        if front:
            self._queue.appendleft(w)
        else:
            self._queue.append(w)
        self.waiting_tokens += prompt_tokens
        return w

    def remove(self, w: Waiting[P]) -> None:
        """A request that left while waiting (cancelled): it frees its place."""
        try:
            self._queue.remove(w)
        except ValueError:
            return
        self.waiting_tokens -= w.prompt_tokens

    def dispatch(self, try_route: Callable[[Waiting[P]], P | None]) -> int:
        """Places every waiting request that fits, oldest first (see the module docstring);
        resolves their futures and returns how many went."""
        now, placed = self.clock(), 0
        for i, w in enumerate(list(self._queue)):
            if i == 0 and w.head_since is None:
                w.head_since = now
            placement = try_route(w)
            if placement is None:
                if i == 0 and w.head_since is not None and now - w.head_since >= self.max_head_wait_s:
                    break  # the oldest has waited long enough: nobody younger goes ahead of it
                continue
            self._queue.remove(w)
            self.waiting_tokens -= w.prompt_tokens
            self._dispatched.append(now)
            placed += 1
            if not w.placed.done():
                w.placed.set_result(placement)
        if self._queue and self._queue[0].head_since is None:
            self._queue[0].head_since = now
        return placed

    def expire(self, max_wait_s: float, error: Callable[[Waiting[P]], BaseException]) -> int:
        """Ends the requests that have waited longer than `max_wait_s` with `error(w)`."""
        now, n = self.clock(), 0
        for w in [w for w in self._queue if now - w.enqueued_at > max_wait_s]:
            self.remove(w)
            if not w.placed.done():
                w.placed.set_exception(error(w))
                n += 1
        return n

    def fail_all(self, error: BaseException) -> None:
        """Ends every waiting request with `error` (the router is stopping)."""
        while self._queue:
            w = self._queue.popleft()
            if not w.placed.done():
                w.placed.set_exception(error)
        self.waiting_tokens = 0

    def retry_after_ms(self) -> int:
        """How long the current queue takes to drain at the recent dispatch rate, within [0.1, 30] s."""
        if len(self._dispatched) < 2:
            return 1000
        span = max(self._dispatched[-1] - self._dispatched[0], 1e-3)
        rate = (len(self._dispatched) - 1) / span
        return int(min(max(len(self._queue) / rate, 0.1), 30.0) * 1000)
