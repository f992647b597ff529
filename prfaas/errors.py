"""Domain errors and the status code each one carries. Plain Python: no grpc, no torch.

Every error a core raises on purpose is a `PrfaasError` whose `code` says what kind of failure it
is, in the vocabulary of gRPC's canonical status codes. The gRPC edge (`prfaas.rpc.status`) maps
`code` to `grpc.StatusCode` in one table; the raw-TCP data plane sends `code.number` in its
verdict frame; nobody parses a status back out of a message string.
"""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    """gRPC's canonical status codes (the names, with their wire numbers in `number`)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"

    @property
    def number(self) -> int:
        """The canonical number (the same on every gRPC implementation)."""
        return _ORDER.index(self)

    @classmethod
    def from_number(cls, n: int) -> Code:
        return _ORDER[n] if 0 <= n < len(_ORDER) else cls.UNKNOWN


_ORDER: tuple[Code, ...] = tuple(Code)


class PrfaasError(Exception):
    """Base of the errors the cores raise on purpose; `code` classifies them."""

    code: Code = Code.INTERNAL


class InvalidRequest(PrfaasError, ValueError):
    """A request refused as given: the message says which field is wrong."""

    code = Code.INVALID_ARGUMENT


class OutOfCapacity(PrfaasError, RuntimeError):
    """Not enough free blocks or state slots for the request (now)."""

    code = Code.RESOURCE_EXHAUSTED


class ModelFault(PrfaasError):
    """The model produced what it must not (non-finite logits): the request's KV, its state or
    the weights are corrupt. Not worth retrying elsewhere with the same input."""

    code = Code.INTERNAL


class RemoteError(PrfaasError):
    """A call to another service ended with this code (the client side of any edge raises it)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class Draining(PrfaasError):
    """The service is shutting down: it finishes what it has and takes nothing new."""

    code = Code.UNAVAILABLE


class NotPermitted(PrfaasError):
    """The caller may not do this (an identity or membership check refused it)."""

    code = Code.PERMISSION_DENIED


class NotConvertible(PrfaasError):
    """A node asked to change its role that was not started convertible."""

    code = Code.FAILED_PRECONDITION
