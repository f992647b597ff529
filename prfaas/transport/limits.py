"""Hostile-input limits of the KV data plane (issue 10, part 4): what a decode node accepts from
a peer before it has proven anything, and how the prefill side keeps its connection pool clean.

Every number has a setting (`prfaas/settings.py`, flags `--kv-*`, env `PRFAAS_KV_*`); the
defaults are sized so that no legitimate transfer comes near them (docs/transport.md, "Limits").

  - `max_frame_bytes`: the largest frame a connection may declare, whatever the transfer. Raised
    to the layout's largest state plus header slack where that is larger (a state travels whole).
  - `max_inflight_bytes`: frames being received at once on the node, all connections together; a
    frame that does not fit waits (its connection stops reading) until earlier frames are done.
  - `max_connections`, `max_connections_per_peer`: concurrent data-plane connections in total and
    per peer (the source address; the certificate identity once the TLS work lands).
  - `read_timeout_s`: a frame that has started must be complete within this.
  - `idle_timeout_s`: a connection that has not yet completed a transfer closes after this long
    without a frame; `pooled_idle_timeout_s` for one that has (a sender's pooled connection).
  - `parallel_verify_bytes`: frames at least this large are checksummed in a worker thread, so
    the event loop (and every stream's tokens) never waits on one big frame.
Sender side: `pool_per_address` idle connections per decode address, closed after
`pool_idle_s` (shorter than the receiver's pooled idle limit, so the sender closes first).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20

# The header of a chunk (everything but `payload` and `scales`) is a few dozen bytes; a frame's
# first `HEADER_READ_BYTES` must hold it whole, so it is parsed before the frame is allocated.
HEADER_READ_BYTES = 1024
MAX_TRANSFER_ID_BYTES = 256
MAX_DTYPE_BYTES = 16
MAX_SHAPE_DIMS = 8
MAX_VARINT_BYTES = 10  # a 64-bit varint
HEADER_SLACK = 64 + HEADER_READ_BYTES  # tags and length prefixes of payload/scales, checksum, a margin


@dataclass(frozen=True)
class KvLimits:
    max_frame_bytes: int = 64 * MiB
    max_inflight_bytes: int = 1024 * MiB
    max_connections: int = 1024
    max_connections_per_peer: int = 256
    read_timeout_s: float = 15.0
    idle_timeout_s: float = 10.0
    pooled_idle_timeout_s: float = 300.0
    parallel_verify_bytes: int = 1 * MiB
    pool_per_address: int = 16
    pool_idle_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_inflight_bytes < self.max_frame_bytes:
            raise ValueError(
                f"kv max in-flight bytes ({self.max_inflight_bytes}) must be >= the max frame ({self.max_frame_bytes})"
            )
        if min(self.max_frame_bytes, self.max_connections, self.max_connections_per_peer, self.pool_per_address) <= 0:
            raise ValueError("kv limits must be positive")

    def frame_cap(self, largest_piece_bytes: int) -> int:
        """The global frame bound: the configured max, or the layout's largest piece (a whole
        state) plus header slack where that is larger."""
        return max(self.max_frame_bytes, largest_piece_bytes + HEADER_SLACK)


DEFAULT_LIMITS = KvLimits()


def limits_from_settings(s: object) -> KvLimits:
    """The limits of a `NodeSettings` (fields `kv_*` named like `KvLimits`'s)."""
    return KvLimits(**{f: getattr(s, f"kv_{f}") for f in KvLimits.__dataclass_fields__ if hasattr(s, f"kv_{f}")})
