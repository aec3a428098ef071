"""Token authorization of the gRPC ports, as TorchServe's gRPC interceptor does it.

With token authorization on, every call must carry the metadata ``authorization:
Bearer <key>``: the inference key on 7070, the management key on 7071. A call without
it, or with a wrong or expired key, is closed with PERMISSION_DENIED and TorchServe's
message, before its servicer runs. Keys are checked by :class:`control.http.auth.TokenAuth`
(this process's copy of the digests, refreshed as the HTTP ports refresh theirs), so a
key rotated through ``GET /token`` works here at once too.

``Ping`` needs no key, as HTTP ``/ping`` needs none: health probes cannot carry secrets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio
import redis

from control.core.errors import AUTHORIZATION_FAILED
from control.grpc.status import details, redis_down
from control.http.auth import TokenAuth, bearer_key

#: Full names of the methods any caller may call (the health probe).
EXEMPT = frozenset({"/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping"})

# Strings: grpc's classes are generic only in their type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Checks ``role``'s key (``inference`` or ``management``) on every call but
    :data:`EXEMPT`; ``auth`` holds the copy of the digests."""

    def __init__(self, auth: TokenAuth, role: str) -> None:
        self._auth = auth
        self._role = role

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in EXEMPT:
            return handler
        presented: str | None = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = bearer_key(value)
        try:
            ok = await self._auth.verify(self._role, presented)
        except (redis.ConnectionError, redis.TimeoutError):
            return refusing(handler, grpc.StatusCode.UNAVAILABLE, details(redis_down()))
        if ok:
            return handler
        return refusing(handler, grpc.StatusCode.PERMISSION_DENIED, AUTHORIZATION_FAILED)


def refusing(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same shape as ``handler`` (unary or streaming either way, same
    (de)serializers) that closes every call with ``code`` and ``message``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover (a generator: the streaming handlers' shape)

    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, deserialize, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, deserialize, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(refuse, deserialize, serialize)
