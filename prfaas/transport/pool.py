"""The prefill side's pool of idle raw-TCP data-plane connections, per event loop and address.

A connection goes back to the pool after a clean verdict, so the next transfer to that decode
node pays no handshake or slow start. An idle pooled connection must stay quiet: the pool
watches each one for readability (`loop.add_reader`), and anything (the peer's FIN, a reset, bytes
out of turn) closes it at once, so connections to a decode node that died or restarted never sit
in CLOSE-WAIT. A connection idle for `idle_s` is closed too (shorter than the receiver's pooled
idle limit, so the sender closes first and never reuses one the receiver is closing); at most
`per_address` wait per address; `retain(addresses)` drops the pools of addresses no longer
registered; `take` checks readability again before handing one out.

Pooled objects need only `fileno()` and `close()` (a plain socket; an `ssl.SSLSocket` also works:
one with decrypted bytes `pending()` counts as readable).
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import Iterable
from typing import Any

from prfaas.transport.limits import DEFAULT_LIMITS

Key = tuple[str, int]


def readable(sock: Any) -> bool:
    """True when the peer has closed, reset or sent anything (an idle connection must do none)."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLPRI)
        return bool(p.poll(0))
    except (OSError, ValueError):
        return True


class IdlePool:
    def __init__(self, per_address: int = DEFAULT_LIMITS.pool_per_address,
                 idle_s: float = DEFAULT_LIMITS.pool_idle_s) -> None:
        self.per_address, self.idle_s = per_address, idle_s
        self._idle: dict[Key, list[tuple[Any, asyncio.TimerHandle]]] = {}
        self.evicted = 0  # closed while idle (peer gone, bytes out of turn, idle too long, pruned)

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def count(self, key: Key) -> int:
        return len(self._idle.get(key, ()))

    def take(self, key: Key) -> Any | None:
        """An idle, still-quiet connection to `key`, or None."""
        idle = self._idle.get(key)
        while idle:
            sock, timer = idle.pop()
            self._unwatch(sock, timer)
            if not readable(sock):
                return sock
            self.evicted += 1
            sock.close()
        self._idle.pop(key, None)
        return None

    def give(self, key: Key, sock: Any) -> None:
        """Back to the pool after a clean verdict (closed if the pool for `key` is full)."""
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.per_address or readable(sock):
            sock.close()
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.idle_s, self._evict, key, sock)
        loop.add_reader(sock.fileno(), self._evict, key, sock)
        idle.append((sock, timer))

    def retain(self, addresses: Iterable[Key]) -> None:
        """Closes the idle connections of every address not in `addresses` (those no longer
        registered with the cluster)."""
        keep = set(addresses)
        for key in [k for k in self._idle if k not in keep]:
            self.drop(key)

    def drop(self, key: Key) -> None:
        for sock, timer in self._idle.pop(key, []):
            self._unwatch(sock, timer)
            self.evicted += 1
            sock.close()

    def close(self) -> None:
        for key in list(self._idle):
            self.drop(key)

    def _evict(self, key: Key, sock: Any) -> None:
        idle = self._idle.get(key, [])
        for i, (s, timer) in enumerate(idle):
            if s is sock:
                idle.pop(i)
                self._unwatch(sock, timer)
                self.evicted += 1
                sock.close()
                break
        if not idle:
            self._idle.pop(key, None)

    @staticmethod
    def _unwatch(sock: Any, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        try:
            fd = sock.fileno()
            if fd >= 0:
                asyncio.get_running_loop().remove_reader(fd)
        except (OSError, ValueError, RuntimeError):
            pass


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdlePool] = weakref.WeakKeyDictionary()


def loop_pool() -> IdlePool:
    """The running event loop's pool (sockets are registered with one loop's selector)."""
    loop = asyncio.get_running_loop()
    pool = _POOLS.get(loop)
    if pool is None:
        pool = _POOLS[loop] = IdlePool()
    return pool


def configure(per_address: int, idle_s: float) -> None:
    """Sets the running loop's pool limits (a prefill node, from its settings)."""
    pool = loop_pool()
    pool.per_address, pool.idle_s = per_address, idle_s
