"""Client bearer tokens and per-client concurrency.

`TokenFile(path)`: one token a line, optionally `name:token` (a line without a name is named by
its line number); blank lines and `#` comments are skipped. The file is read again whenever its
modification time or size changes, so tokens rotate without a restart: add the new token, move
the clients over, remove the old one. A file that cannot be read or parsed keeps the last good
set (and says so in the log); tokens are compared in constant time.

`ClientLimiter(n)`: at most `n` calls per client identity at once (0 = no limit); past it the call
is refused RESOURCE_EXHAUSTED (HTTP 429 at the front door).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from prfaas.obs.log import get_logger

log = get_logger(__name__)


class TokenFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._tokens: list[tuple[str, bytes]] = []
        self._reload()
        if not self._tokens:
            raise ValueError(f"{self.path}: no tokens in it")

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            tokens = parse_tokens(self.path.read_text())
        except (OSError, ValueError) as e:
            if self._stamp is None:
                raise ValueError(f"token file {self.path}: {e}") from None
            log.warning("token_file_unreadable_keeping_the_last", path=str(self.path), error=str(e))
            return
        self._stamp, self._tokens = stamp, tokens
        log.info("token_file_loaded", path=str(self.path), tokens=len(tokens))

    def lookup(self, token: str) -> str | None:
        """The name of `token`, or None."""
        self._reload()
        raw = token.encode()
        found = None
        for name, t in self._tokens:
            if hmac.compare_digest(raw, t) and found is None:
                found = name
        return found


def parse_tokens(text: str) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.rpartition(":")
        name, token = (name.strip(), token.strip()) if sep else (f"line{i}", line)
        if len(token) < 16:
            raise ValueError(f"line {i}: a token must be at least 16 characters")
        out.append((name or f"line{i}", token.encode()))
    return out


class ClientLimiter:
    def __init__(self, max_per_client: int) -> None:
        self.max = max_per_client
        self.held: dict[str, int] = {}

    def try_acquire(self, client: str | None) -> bool:
        if client is None or self.max <= 0:
            return True
        n = self.held.get(client, 0)
        if n >= self.max:
            return False
        self.held[client] = n + 1
        return True

    def release(self, client: str | None) -> None:
        if client is None or self.max <= 0:
            return
        n = self.held.get(client, 1) - 1
        if n > 0:
            self.held[client] = n
        else:
            self.held.pop(client, None)
