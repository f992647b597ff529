"""Domain errors <-> gRPC status codes: the one table, for every servicer and every client.

A `PrfaasError` carries its `Code` (prfaas/errors.py); here it becomes the `grpc.StatusCode` of
the same name. `grpc_errors` wraps a streaming handler's body, `mapped` a unary handler; both
abort with the mapped status and the error's message, and turn anything unexpected into INTERNAL.
Clients turn a failed call back into a `Code` with `code_of`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from prfaas.errors import Code, PrfaasError
from prfaas.obs.log import get_logger

log = get_logger(__name__)

R = TypeVar("R")

STATUS: dict[Code, grpc.StatusCode] = {c: grpc.StatusCode[c.name] for c in Code}
CODE: dict[grpc.StatusCode, Code] = {v: k for k, v in STATUS.items()}


def code_of(status: grpc.StatusCode | None) -> Code:
    return CODE.get(status, Code.UNKNOWN) if status is not None else Code.UNKNOWN


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a servicer answers for `e`: its code's, or INTERNAL for an unexpected error."""
    if isinstance(e, PrfaasError):
        return STATUS[e.code], getattr(e, "message", None) or str(e)
    if isinstance(e, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e) or "timed out"
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


RETRY_AFTER_KEY = "retry-after-ms"  # a refusal for load says when to come back (OpenAI's 429 Retry-After)
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # the same, for gRPC clients with a retry policy


async def abort(context: grpc.aio.ServicerContext, e: BaseException) -> None:
    code, details = status_of(e)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal_error", error=repr(e), exc_info=e)
    retry_after_ms = getattr(e, "retry_after_ms", None)
    if retry_after_ms is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(retry_after_ms)), (PUSHBACK_KEY, str(retry_after_ms))))
    await context.abort(code, details)


@contextlib.asynccontextmanager
async def grpc_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Maps errors raised inside the block to a status (see `status_of`)."""
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except grpc.aio.AioRpcError as e:  # a downstream call failed: pass its status on
        await context.abort(e.code(), e.details() or "")
    except Exception as e:
        await abort(context, e)


def mapped(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """The same mapping for a unary (or stream-unary) handler."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        async with grpc_errors(context):
            return await method(self, request, context)
        raise AssertionError("unreachable: grpc_errors aborted")  # pragma: no cover

    return wrapper
