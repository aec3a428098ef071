"""TorchServe's translation of an HTTP answer's status into a gRPC status code.

TorchServe closes a failed call with the gRPC code its table gives for the HTTP status
the same failure has on the HTTP ports, and the HTTP error's message as description,
to which it appends the exception's name on a line of its own (Java's
``Status.augmentDescription``). mqserve appends the simple name the HTTP body's
``type`` field carries (``ModelNotFoundException``), where TorchServe appends the
Java class's full name.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
import redis

from control.core.errors import (
    InternalServerException,
    ModelServerError,
    ServiceUnavailableException,
)
from control.http.common import REDIS_DOWN

log = logging.getLogger(__name__)

_EXACT = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    416: grpc.StatusCode.OUT_OF_RANGE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status: TorchServe's table, then 2xx OK, other 4xx
    FAILED_PRECONDITION, anything else INTERNAL."""
    exact = _EXACT.get(http_status)
    if exact is not None:
        return exact
    if 200 <= http_status < 300:
        return grpc.StatusCode.OK
    if 400 <= http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def details(error: ModelServerError) -> str:
    """The call's description for ``error``: its HTTP message, then its type's name."""
    return f"{error.message}\n{error.type}"


def redis_down() -> ServiceUnavailableException:
    """What every port answers while Redis cannot be reached (UNAVAILABLE here)."""
    return ServiceUnavailableException(REDIS_DOWN)


S = TypeVar("S")
Q = TypeVar("Q")
R = TypeVar("R")
Method = Callable[[S, Q, grpc.aio.ServicerContext[Q, R]], Awaitable[R]]


def answers_errors(method: Method[S, Q, R]) -> Method[S, Q, R]:
    """Wrap a unary servicer method: a :class:`ModelServerError` closes the call with
    :func:`grpc_code` of its HTTP status and :func:`details`; an unreachable Redis with
    UNAVAILABLE (the HTTP ports' 503); anything else is logged and INTERNAL, with no
    stack trace for the client (as the HTTP ports' generic 500)."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Q, context: grpc.aio.ServicerContext[Q, R]) -> R:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method closed the call itself
        except Exception as exc:
            await abort_for(exc, context, method.__name__)
        raise AssertionError("context.abort returned")  # it always raises

    return wrapper


def streams_errors(
    method: Callable[[S, Q, grpc.aio.ServicerContext[Q, R]], AsyncIterator[R]],
) -> Callable[[S, Q, grpc.aio.ServicerContext[Q, R]], AsyncIterator[R]]:
    """:func:`answers_errors` for a server-streaming method (an async generator): an
    error before or between its messages closes the call the same way."""

    @functools.wraps(method)
    async def wrapper(
        self: S, request: Q, context: grpc.aio.ServicerContext[Q, R]
    ) -> AsyncIterator[R]:
        try:
            async for message in method(self, request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_for(exc, context, method.__name__)

    return wrapper


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext[Any, Any], name: str) -> None:
    """Close the call for ``exc`` (the mapping :func:`answers_errors` documents)."""
    if isinstance(exc, ModelServerError):
        await context.abort(grpc_code(exc.status), details(exc))
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        log.warning("Redis unavailable in %s: %s", name, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, details(redis_down()))
    log.error("unhandled error in %s", name, exc_info=exc)
    error = InternalServerException("Internal Server Error")
    await context.abort(grpc.StatusCode.INTERNAL, details(error))
