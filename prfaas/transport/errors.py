"""Transfer errors, shared by the receiver (which raises them), the servicer (which maps them to
gRPC status codes) and the sender (which turns the receiver's status back into them)."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "NOT_FOUND",          # unknown, finished or expired transfer
    "INVALID_ARGUMENT",   # kind, shape, dtype or token range contradicts the layout or the transfer
    "ALREADY_EXISTS",     # duplicate seq, or a token range that overlaps one already received
    "DATA_LOSS",          # checksum mismatch
    "DEADLINE_EXCEEDED",  # the transfer's deadline passed before every chunk arrived
    "CANCELLED",          # cancelled by the decode side (request gone) or aborted by the sender
    "UNAVAILABLE",        # sender side: the connection failed
    "INTERNAL",           # anything else
]


class TransferError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message
