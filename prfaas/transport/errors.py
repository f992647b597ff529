"""Transfer errors: what the receiver raises for a chunk or a transfer, what the sender raises
when the receiver (or the connection) gave up. The code is typed end to end: the gRPC plane
carries it as the call's status (and a trailing-metadata key), the TCP plane as a number in its
verdict frame."""

from __future__ import annotations

from prfaas.errors import Code, PrfaasError

# the codes a transfer can end with
TRANSFER_CODES = frozenset({
    Code.NOT_FOUND,          # unknown, finished or expired transfer
    Code.INVALID_ARGUMENT,   # kind, shape, dtype or token range contradicts the layout or the transfer
    Code.ALREADY_EXISTS,     # duplicate seq, or a token range that overlaps one already received
    Code.DATA_LOSS,          # checksum mismatch
    Code.DEADLINE_EXCEEDED,  # the transfer's deadline passed before every chunk arrived
    Code.CANCELLED,          # cancelled by the decode side (request gone) or aborted by the sender
    Code.RESOURCE_EXHAUSTED, # the decode node's data port holds its limit of connections (in total or this peer's)
    Code.UNAVAILABLE,        # sender side: the connection failed
    Code.PERMISSION_DENIED,  # a chunk from a peer the transfer does not take KV from; a server that is
                             # not the node the sender expects (mutual TLS)
    Code.INTERNAL,           # anything else
})


class TransferError(PrfaasError):
    def __init__(self, code: Code | str, message: str) -> None:
        super().__init__(message)
        code = Code(code)
        self.code = code if code in TRANSFER_CODES else Code.INTERNAL
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
