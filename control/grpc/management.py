"""The management service of port 7071: TorchServe's six RPCs over the HTTP API's operations.

Every RPC answers ``ManagementResponse{msg}`` with the JSON text the HTTP management
API answers for the same operation (pretty-printed as Gson prints it, without the
newline that ends an HTTP body): describe's array, list's ``{"models": [...]}``,
``{"status": "..."}`` for the rest. The operations are the HTTP port's own:
:class:`ManagementReads` for describe and list (one async Redis round trip),
:class:`ManagementService` for the others, which block and run in a pool of
``api_threads`` threads, as on the HTTP port.

proto3 cannot tell a field left out from its zero value, so, as TorchServe, a zero
value means "not given" (:func:`register_params`, :func:`scale_params`,
:func:`list_params`): ``0`` and ``""`` take the HTTP defaults (``initial_workers`` 0 is
``default_workers_per_model``; scale's ``min_worker`` 0 is 1 and ``max_worker`` 0 is
``min_worker``), while a ``bool`` is what it says (``synchronous`` is false unless
sent: registrations are asynchronous by default over gRPC, unlike HTTP's).
``s3_sse_kms``, ``number_gpu`` and scale's ``timeout`` are accepted and ignored (mqserve
places GPUs itself and has no S3 downloads). ``RegisterModel`` and ``UnregisterModel``
answer PERMISSION_DENIED ``Model API disabled`` unless ``enable_model_api``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc.aio

from control.grpc.protos import management_pb2, management_pb2_grpc
from control.grpc.status import answers_errors
from control.http.common import dumps
from control.http.params import Params
from control.management.reads import ManagementReads
from control.management.service import ManagementService

MODEL_API_DISABLED = "Model API disabled"

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, management_pb2.ManagementResponse]


def response(body: Any) -> management_pb2.ManagementResponse:
    """``body`` as the HTTP port prints it (less the final newline)."""
    return management_pb2.ManagementResponse(msg=dumps(body).decode().rstrip("\n"))


def _given(values: dict[str, Any]) -> Params:
    """Params of the fields that are not proto3 zero values ("not given")."""
    return Params({k: v for k, v in values.items() if v not in (0, "") or isinstance(v, bool)})


def register_params(request: management_pb2.RegisterModelRequest) -> Params:
    """``POST /models``'s parameters from a ``RegisterModelRequest`` (zero = not given)."""
    return _given(
        {
            "url": request.url,
            "model_name": request.model_name,
            "handler": request.handler,
            "runtime": request.runtime,
            "batch_size": request.batch_size,
            "max_batch_delay": request.max_batch_delay,
            "initial_workers": request.initial_workers,
            "response_timeout": request.response_timeout,
            "startup_timeout": request.startup_timeout,
            "synchronous": request.synchronous,
        }
    )


def scale_params(request: management_pb2.ScaleWorkerRequest) -> Params:
    """``PUT /models/{name}``'s parameters from a ``ScaleWorkerRequest`` (zero = not given)."""
    return _given(
        {
            "min_worker": request.min_worker,
            "max_worker": request.max_worker,
            "synchronous": request.synchronous,
        }
    )


def list_params(request: management_pb2.ListModelsRequest) -> Params:
    """``GET /models``'s parameters from a ``ListModelsRequest`` (zero = not given)."""
    return _given({"limit": request.limit, "next_page_token": request.next_page_token})


class ManagementServicer(management_pb2_grpc.ManagementAPIsServiceServicer):
    """``ManagementAPIsService`` over the HTTP port's service and reads."""

    def __init__(self, service: ManagementService, reads: ManagementReads) -> None:
        self._svc = service
        self._reads = reads
        self._pool = ThreadPoolExecutor(
            max_workers=service.settings.api_threads, thread_name_prefix="grpc-management"
        )

    def close(self) -> None:
        """Let the pool's threads go (once the server has stopped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(call, *args))

    async def _model_api(self, context: Context) -> None:
        if not self._svc.settings.enable_model_api:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, MODEL_API_DISABLED)

    @answers_errors
    async def DescribeModel(
        self, request: management_pb2.DescribeModelRequest, context: Context
    ) -> management_pb2.ManagementResponse:
        """``GET /models/{name}[/{version}][?customized=true]``."""
        docs = await self._reads.describe(
            request.model_name, request.model_version or None, request.customized
        )
        return response(docs)

    @answers_errors
    async def ListModels(
        self, request: management_pb2.ListModelsRequest, context: Context
    ) -> management_pb2.ManagementResponse:
        """``GET /models?limit=&next_page_token=``."""
        return response(await self._reads.list_models(list_params(request)))

    @answers_errors
    async def RegisterModel(
        self, request: management_pb2.RegisterModelRequest, context: Context
    ) -> management_pb2.ManagementResponse:
        """``POST /models``."""
        await self._model_api(context)
        _, message = await self._blocking(self._svc.register, register_params(request))
        return response({"status": message})

    @answers_errors
    async def ScaleWorker(
        self, request: management_pb2.ScaleWorkerRequest, context: Context
    ) -> management_pb2.ManagementResponse:
        """``PUT /models/{name}[/{version}]``."""
        _, message = await self._blocking(
            self._svc.scale,
            request.model_name,
            request.model_version or None,
            scale_params(request),
        )
        return response({"status": message})

    @answers_errors
    async def SetDefault(
        self, request: management_pb2.SetDefaultRequest, context: Context
    ) -> management_pb2.ManagementResponse:
        """``PUT /models/{name}/{version}/set-default``."""
        _, message = await self._blocking(
            self._svc.set_default, request.model_name, request.model_version
        )
        return response({"status": message})

    @answers_errors
    async def UnregisterModel(
        self, request: management_pb2.UnregisterModelRequest, context: Context
    ) -> management_pb2.ManagementResponse:
        """``DELETE /models/{name}[/{version}]``."""
        await self._model_api(context)
        _, message = await self._blocking(
            self._svc.unregister, request.model_name, request.model_version or None
        )
        return response({"status": message})
