"""The decode side of the raw-TCP data plane: `FrameProtocol` reads `u32 length | KvChunk` frames
and `Gate` holds the limits every connection shares (prfaas/transport/limits.py).

Nothing a peer declares is allocated before it is checked. Per frame:
  1. the 4-byte length: a frame longer than the global cap is refused at once;
  2. the first `HEADER_READ_BYTES` (or the whole frame, when smaller) into a buffer the
     connection owns: `parse_header` reads the chunk's header from them (bounded parser), and
     the receiver checks that it names a live transfer and a chunk that transfer still needs,
     and that the declared length is no more than that chunk takes;
  3. only then the node's in-flight budget is reserved (a frame that does not fit waits, its
     connection paused) and the frame allocated; the rest is read straight into it;
  4. a frame of `parallel_verify_bytes` or more is checksummed in a worker thread (the
     connection paused meanwhile), so the event loop never stalls on one.
A frame that has started must finish within `read_timeout_s`; a connection that never carried
an accepted chunk closes after `idle_timeout_s` without one, a proven one (a sender's pooled
connection) after `pooled_idle_timeout_s`. Connections are capped in total and per peer.

Works the same over asyncio's plain and SSL transports: both call `get_buffer`/`buffer_updated`
and honour `pause_reading` (bytes that arrive while paused anyway are kept and replayed).
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable

from prfaas.errors import Code
from prfaas.obs.log import get_logger
from prfaas.security import tls
from prfaas.transport.errors import TransferError
from prfaas.transport.limits import HEADER_READ_BYTES, KvLimits
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.wire import WireChunk, chunk_crc, parse_chunk, parse_header

log = get_logger(__name__)

LEN = struct.Struct("<I")
ACK = struct.Struct("<IQ")
PeerId = Callable[[asyncio.BaseTransport], str]


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The default peer identity: the source address (the TLS work may name the certificate)."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


class Gate:
    """What the connections of one data port share: the receiver, the limits, the connection
    counts per peer and the node's in-flight receive bytes."""

    def __init__(self, receiver: KvReceiver, limits: KvLimits, peer_id: PeerId = peer_address) -> None:
        self.receiver, self.limits, self.peer_id = receiver, limits, peer_id
        self.per_peer: dict[str, int] = {}
        self.connections = 0
        self.inflight = 0
        self.peak_inflight = 0
        self.refused = 0  # connections refused over a cap
        self.waits = 0  # frames that waited for in-flight budget
        self._waiting: deque[tuple[int, FrameProtocol]] = deque()

    def frame_cap(self) -> int:
        return self.limits.frame_cap(self.receiver.largest_piece_bytes)

    def admit(self, peer: str) -> str | None:
        """Counts a new connection in; the reason it is refused, if it is."""
        if self.connections >= self.limits.max_connections:
            return f"the KV data port holds {self.connections} connections (its limit)"
        if self.per_peer.get(peer, 0) >= self.limits.max_connections_per_peer:
            return f"peer {peer} holds {self.per_peer[peer]} KV connections (its limit)"
        self.connections += 1
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        return None

    def leave(self, peer: str) -> None:
        self.connections -= 1
        left = self.per_peer.get(peer, 1) - 1
        if left > 0:
            self.per_peer[peer] = left
        else:
            self.per_peer.pop(peer, None)

    def reserve(self, n: int, proto: FrameProtocol) -> bool:
        """Reserves `n` in-flight bytes now, or queues `proto` (granted in order by `release`)."""
        while self._waiting and self._waiting[0][1].closed:
            self._waiting.popleft()
        if not self._waiting and self.inflight + n <= self.limits.max_inflight_bytes:
            self.inflight += n
            self.peak_inflight = max(self.peak_inflight, self.inflight)
            return True
        self._waiting.append((n, proto))
        self.waits += 1
        return False

    def release(self, n: int) -> None:
        self.inflight -= n
        while self._waiting:
            want, proto = self._waiting[0]
            if proto.closed:
                self._waiting.popleft()
                continue
            if self.inflight + want > self.limits.max_inflight_bytes:
                return
            self._waiting.popleft()
            self.inflight += want
            self.peak_inflight = max(self.peak_inflight, self.inflight)
            proto.granted()


_LENGTH, _HEAD, _BODY, _WAIT, _DONE = range(5)


class FrameProtocol(asyncio.BufferedProtocol):
    """One data-plane connection (see the module docstring)."""

    _scratch = bytearray(4096)  # where bytes go while paused or done (copied out at once): shared

    def __init__(self, gate: Gate, on_close: Callable[[FrameProtocol], None]) -> None:
        self.gate, self.on_close = gate, on_close
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.closed = False
        self._small = bytearray(LEN.size)
        self._head = bytearray(HEADER_READ_BYTES)
        self._stash = bytearray()  # bytes that arrived while paused
        self._state, self._buf, self._pos, self._want = _LENGTH, memoryview(self._small), 0, LEN.size
        self._size = self._reserved = 0
        self.chunks = self.bytes = 0
        self._seen: set[str] = set()  # transfers this connection carried chunks of since its last verdict
        self._proven = False  # an accepted chunk arrived on it: a sender's (pooled) connection
        self._timer: asyncio.TimerHandle | None = None
        self._born = 0.0
        self._resume_state = _LENGTH

    # --- asyncio's side ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._born = asyncio.get_running_loop().time()
        self.peer = self.gate.peer_id(transport)
        cfg = tls.current()  # under TLS (after the handshake): the sender's verified node id
        who = None if cfg.insecure else cfg.peer(transport.get_extra_info("peercert"))
        self.identity: str | None = None if cfg.insecure else who.name if who else ""
        refused = self.gate.admit(self.peer)
        if refused is not None:
            self.gate.refused += 1
            self.peer = ""
            log.warning("kv_connection_refused", reason=refused)
            return self._reply_error(TransferError(Code.RESOURCE_EXHAUSTED, refused))
        self._arm()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state in (_WAIT, _DONE):
            return memoryview(self._scratch)
        return self._buf[self._pos : self._want]

    def buffer_updated(self, nbytes: int) -> None:
        if self._state in (_WAIT, _DONE):
            if self._state == _WAIT:
                self._stash += self._scratch[:nbytes]
            return
        if self._state == _LENGTH and self._pos == 0:
            self._arm(reading=True)
        self._pos += nbytes
        if self._pos < self._want:
            return
        try:
            self._step()
        except TransferError as e:
            self._reply_error(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if self._reserved:
            self.gate.release(self._reserved)
            self._reserved = 0
        for tid in self._seen:  # a connection that breaks mid-transfer breaks its transfers
            self.gate.receiver.cancel(tid, "the sender's KV connection broke")
        if self.peer:
            self.gate.leave(self.peer)
        self.on_close(self)

    # --- the frame state machine -------------------------------------------------------------
    def _expect(self, state: int, buf: memoryview, want: int, pos: int = 0) -> None:
        self._state, self._buf, self._want, self._pos = state, buf, want, pos

    def _step(self) -> None:
        if self._state == _LENGTH:
            self._size = LEN.unpack(self._small)[0]
            if self._size == 0:
                return self._end_of_share()
            cap = self.gate.frame_cap()
            if self._size > cap:
                raise TransferError(Code.INVALID_ARGUMENT, f"KV frame of {self._size} bytes (the limit is {cap})")
            return self._expect(_HEAD, memoryview(self._head), min(self._size, HEADER_READ_BYTES))
        if self._state == _HEAD:
            if self._size <= HEADER_READ_BYTES:  # a small frame (the first token): whole already
                return self._complete(memoryview(self._head)[: self._size])
            header = parse_header(memoryview(self._head), self._size)
            self.gate.receiver.check_frame(header, self._size)
            if not self.gate.reserve(self._size, self):
                self._pause()  # granted() resumes
                return
            return self._allocate(rearm=False)  # the frame's read timer runs on from its first byte
        if self._state == _BODY:
            frame = self._buf
            self._expect(_LENGTH, memoryview(self._small), LEN.size)
            self._complete(frame)

    def granted(self) -> None:
        """The gate reserved this connection's frame."""
        if self.closed:
            self.gate.release(self._size)
            return
        self._allocate()
        self._resume()

    def _allocate(self, rearm: bool = True) -> None:
        self._reserved = self._size
        frame = memoryview(bytearray(self._size))
        frame[:HEADER_READ_BYTES] = self._head
        self._expect(_BODY, frame, self._size, HEADER_READ_BYTES)
        if rearm:  # after a wait for budget (which does not count against the sender)
            self._arm(reading=True)

    def _complete(self, frame: memoryview) -> None:
        """A whole frame: parsed, verified (in a thread when large) and handed to the receiver."""
        self._expect(_LENGTH, memoryview(self._small), LEN.size)
        self._disarm()
        chunk = parse_chunk(frame if self._reserved else bytes(frame))
        if len(frame) < self.gate.limits.parallel_verify_bytes:
            self._accept(chunk)
            return self._arm()  # after the accept: the idle limit of a connection proven by this chunk
        self._pause()  # _verified resumes (and arms the idle timer)
        task = asyncio.get_running_loop().run_in_executor(None, chunk_crc, chunk)
        task.add_done_callback(lambda f: self._verified(chunk, f))

    def _verified(self, chunk: WireChunk, f: asyncio.Future[int]) -> None:
        if self.closed:
            return self._free()
        try:
            chunk.crc = f.result()
            self._accept(chunk)
        except TransferError as e:
            return self._reply_error(e)
        except Exception as e:  # the executor refused (shutting down)
            return self._reply_error(TransferError(Code.INTERNAL, repr(e)))
        self._resume()

    def _accept(self, chunk: WireChunk) -> None:
        try:
            self.bytes += self.gate.receiver.on_chunk(chunk, peer=self.identity)
        finally:
            self._free()
        self._seen.add(chunk.transfer_id)
        self._proven = True
        self.chunks += 1

    def _free(self) -> None:
        if self._reserved:
            self.gate.release(self._reserved)
            self._reserved = 0

    def _end_of_share(self) -> None:
        """The end frame: the verdict, then the connection waits for the next transfer."""
        ack = b"K" + ACK.pack(self.chunks, self.bytes)
        self.chunks = self.bytes = 0
        self._seen.clear()
        self._expect(_LENGTH, memoryview(self._small), LEN.size)
        self._arm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(LEN.pack(len(ack)) + ack)

    # --- pausing, timers, errors ----------------------------------------------------------------
    def _pause(self) -> None:
        self._resume_state = self._state
        self._state = _WAIT
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._state == _WAIT:
            self._state = self._resume_state
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        if self._state == _LENGTH and self._pos == 0:
            self._arm()
        stash, self._stash = self._stash, bytearray()
        view = memoryview(stash)
        while view and self._state not in (_WAIT, _DONE):  # replay what arrived while paused
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)
        self._stash += view

    def _arm(self, reading: bool = False) -> None:
        """The timer of the current phase: a frame being read, or the wait for the next one."""
        self._disarm()
        lim, loop = self.gate.limits, asyncio.get_running_loop()
        if reading:
            delay, why = lim.read_timeout_s, f"a KV frame did not complete within {lim.read_timeout_s:g} s"
        elif self._proven:
            delay, why = lim.pooled_idle_timeout_s, ""
        else:  # counted from the connect: empty shares do not keep an unproven connection open
            delay, why = max(0.0, self._born + lim.idle_timeout_s - loop.time()), ""
        self._timer = loop.call_later(delay, self._timed_out, why)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, why: str) -> None:
        self._timer = None
        if why:  # a frame started and stalled (a slow or truncated sender): say so, then close
            log.warning("kv_read_timeout", peer=self.peer, state=self._state)
            return self._reply_error(TransferError(Code.DEADLINE_EXCEEDED, why))
        if self.transport is not None:
            self.transport.close()  # idle: a pooled sender sees the close and drops the connection

    def _reply_error(self, e: TransferError) -> None:
        self._state = _DONE
        self._disarm()
        self._free()
        body = b"E" + bytes([e.code.number]) + e.message.encode()[:1024]
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(LEN.pack(len(body)) + body)
            self.transport.close()
