"""The prefill core's two pieces of thread and lock plumbing: a request's hold on the compute lock,
and the hand-off of a part's layer steps from its worker thread to the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator


class Hold:
    """One request's hold on the compute lock, released at most once per acquire."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self.lock, self.held = lock, False

    async def acquire(self) -> None:
        await self.lock.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()


END = object()  # the end of a part's layer steps
LOOKAHEAD = 1  # layers a prefill computes ahead of the one being pushed


class Handoff:
    """A part's layer steps from its worker thread to the event loop: each item as it is computed,
    the thread at most LOOKAHEAD items ahead of the loop's `take`; `stop` ends it after its step.
    With `whole`, all of them at once when the part is done (its KV is pushed after the sample
    anyway, and waking the loop once per layer costs the compute)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, whole: bool = False) -> None:
        self.loop, self.whole = loop, whole
        self.ready: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
        self._room = threading.Semaphore(LOOKAHEAD)
        self._stopped = threading.Event()

    def _put_all(self, items: list[object]) -> None:
        for item in items:
            self.ready.put_nowait((item, None))

    def produce(self, steps: Iterator[object]) -> None:  # in the worker thread
        try:
            if self.whole:
                items = []
                for item in steps:
                    if self._stopped.is_set():
                        return
                    items.append(item)
                self.loop.call_soon_threadsafe(self._put_all, [*items, END])
                return
            for item in steps:
                self.loop.call_soon_threadsafe(self.ready.put_nowait, (item, None))
                while not self._room.acquire(timeout=0.5):
                    if self._stopped.is_set():
                        return
                if self._stopped.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - raised again on the loop, in take()
            self.loop.call_soon_threadsafe(self.ready.put_nowait, (END, e))
            return
        self.loop.call_soon_threadsafe(self.ready.put_nowait, (END, None))

    def take(self, got: tuple[object, BaseException | None]) -> object:
        item, error = got
        if error is not None:
            raise error
        self._room.release()
        return item

    def stop(self) -> None:
        self._stopped.set()
        self._room.release()
