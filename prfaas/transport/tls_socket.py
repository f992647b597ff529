"""The sender's side of mutual TLS on the raw-TCP KV plane: a non-blocking `ssl.SSLSocket` driven
from asyncio (asyncio's own `sock_*` calls refuse SSL sockets, and its TLS streams copy each write
once more). The receiver needs none of this: asyncio's TLS transport runs tcp.py's BufferedProtocol.

- `tls_connect`: the client handshake over a connected socket; the server must present a
  certificate of the cluster CA naming `name` (the decode node's id), or it raises
  `ssl.SSLCertVerificationError`.
- `send_tls`: each buffer with `send` (an SSLSocket has no `sendmsg`). Python enables
  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER but not partial writes, so a non-blocking `send(buf)` takes
  all of `buf` or raises SSLWantWriteError having kept its progress inside OpenSSL: it is retried
  with the same buffer once the socket is writable (never `sendall`, which loses that count).
- `idle_tls_usable`: a pooled connection is usable while nothing is readable on it (the server
  sends no session tickets, so an idle connection is silent until closed).
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

from prfaas.security import tls

T = TypeVar("T")


async def wait_ready(sock: socket.socket, read: bool = False) -> None:
    """Until `sock` can be written (or read, with `read`)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_reader if read else loop.add_writer)(fd, wake)
    try:
        await ready
    finally:
        if sock.fileno() == fd:  # still open, so the registration is ours (a closed fd may be reused)
            (loop.remove_reader if read else loop.remove_writer)(fd)


async def ssl_call(sock: ssl.SSLSocket, fn: Callable[..., T], *args: object) -> T:
    """Runs a non-blocking SSLSocket call until it completes, waiting as OpenSSL asks."""
    while True:
        try:
            return fn(*args)
        except ssl.SSLWantReadError:
            await wait_ready(sock, read=True)
        except ssl.SSLWantWriteError:
            await wait_ready(sock)


async def tls_connect(sock: socket.socket, name: str, timeout_s: float | None) -> ssl.SSLSocket:
    """Mutual TLS over a connected non-blocking socket; the server must be `name` (its node id,
    or a host its certificate names). Raises ssl.SSLError when it is not."""
    wrapped = tls.current().client_context().wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
    await asyncio.wait_for(ssl_call(wrapped, wrapped.do_handshake), timeout_s or tls.HANDSHAKE_TIMEOUT_S)
    return wrapped


async def send_tls(sock: ssl.SSLSocket, views: list[memoryview]) -> None:
    for view in views:
        while view:  # without partial writes OpenSSL takes all of `view` or keeps its progress
            sent = await ssl_call(sock, sock.send, view)
            view = view[sent:]


def idle_tls_usable(sock: ssl.SSLSocket) -> bool:
    if sock.pending():
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)
