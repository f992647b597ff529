"""Domain errors -> gRPC status codes, in one place for every servicer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from prfaas.engine.sampling import InvalidRequest
from prfaas.kv.allocator import OutOfCapacity
from prfaas.model.config import ModelConfigError


def status_for(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    from prfaas.cluster import PoolUnavailableError
    from prfaas.scheduling.policy import NoCapacityError
    from services.router.core import RouteFailed

    if isinstance(e, InvalidRequest | ModelConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, OutOfCapacity | NoCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, RouteFailed | PoolUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e) or "timed out"
    code = getattr(e, "grpc_code", None)
    if isinstance(code, grpc.StatusCode):
        return code, str(e)
    return None


@contextlib.asynccontextmanager
async def grpc_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Maps domain errors raised inside the block to a status; unknown errors become INTERNAL."""
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except grpc.aio.AioRpcError as e:  # a downstream call failed: pass its status on
        await context.abort(e.code(), e.details() or "")
    except Exception as e:
        mapped = status_for(e)
        if mapped is None:
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        else:
            await context.abort(*mapped)
