"""Both gRPC servers (inference on 7070, management on 7071) in one asyncio process.

:func:`build` wires the servicers over one process's Redis clients: one
:class:`~control.core.dispatch.Dispatcher` (one reply listener) for predictions and
``customized`` describes, one :class:`~control.http.auth.TokenAuth` copy of the key
digests per role, one metrics recorder (predictions counted as on the HTTP port).
:func:`serve` binds both ports and runs until SIGTERM or SIGINT, then stops accepting
calls and gives those in flight ``stop_grace`` seconds (as the HTTP ports' gunicorn
does) before cancelling them.

The limits are TorchServe's: ``max_request_size`` and ``max_response_size`` bound the
messages received and sent (a larger one fails with RESOURCE_EXHAUSTED), and the
``grpc_*_max_connection_age[_grace]_ms`` keys set the servers' keepalive ages.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import redis.asyncio

from control.archives.store import model_store
from control.core.dispatch import Dispatcher
from control.core.redis_io import Clients, connect, connect_async
from control.core.settings import Settings
from control.grpc.auth import TokenInterceptor
from control.grpc.inference import InferenceServicer
from control.grpc.management import ManagementServicer
from control.grpc.protos import inference_pb2_grpc, management_pb2_grpc
from control.http.auth import KeyStore, TokenAuth
from control.inference.health import healthy
from control.management.reads import ManagementReads
from control.management.service import ManagementService
from control.metrics.recorder import Flusher, MetricsRecorder

log = logging.getLogger(__name__)

SERVICES = ("inference", "management")


def server_options(settings: Settings, which: str) -> list[tuple[str, Any]]:
    """grpc channel arguments of one server: message limits, connection ages, and no
    ``SO_REUSEPORT`` (so a port already in use fails the start instead of being shared
    with another process)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_request_size),
        ("grpc.max_send_message_length", settings.max_response_size),
        ("grpc.so_reuseport", 0),
    ]
    age = getattr(settings, f"grpc_{which}_max_connection_age_ms")
    grace = getattr(settings, f"grpc_{which}_max_connection_age_grace_ms")
    if age is not None:
        options.append(("grpc.max_connection_age_ms", age))
    if grace is not None:
        options.append(("grpc.max_connection_age_grace_ms", grace))
    return options


def target(host: str, port: int) -> str:
    """``host:port`` as gRPC spells it (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Servers:
    """The two servers and what they share; :meth:`close` after they stopped."""

    inference: grpc.aio.Server
    management: grpc.aio.Server
    dispatcher: Dispatcher
    frames: redis.asyncio.Redis
    clients: Clients
    management_servicer: ManagementServicer
    flusher: Flusher

    async def start(self) -> None:
        """Start serving on both ports (bound by :func:`build`)."""
        await self.inference.start()
        await self.management.start()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting calls; cancel those still running after ``grace`` seconds."""
        await asyncio.gather(self.inference.stop(grace), self.management.stop(grace))

    async def close(self) -> None:
        """Release the reply listener, the pool and the Redis connections."""
        await self.dispatcher.close()
        self.management_servicer.close()
        await asyncio.to_thread(self.flusher.stop)  # its last flush writes to Redis
        await self.frames.aclose()
        self.clients.text.close()
        self.clients.frames.close()


def build(settings: Settings) -> Servers:
    """Both servers, bound to their ports (``grpc_*_address``/``grpc_*_port``), not yet
    started. Must run inside the event loop that will serve them.

    Raises RuntimeError when a port cannot be bound.
    """
    if settings.redis_url is None:
        raise RuntimeError("settings.redis_url must be set before building the gRPC servers")
    clients = connect(settings.redis_url)
    frames = connect_async(settings.redis_url)
    dispatcher = Dispatcher(frames)
    text = clients.text
    store = (
        KeyStore(text, settings.key_file, settings.token_expiration_min)
        if settings.token_auth
        else None
    )

    def interceptors(role: str) -> list[grpc.aio.ServerInterceptor]:
        if store is None:
            return []
        return [TokenInterceptor(TokenAuth(store, role, client=frames), role)]

    inference = grpc.aio.server(
        interceptors=interceptors("inference"), options=server_options(settings, "inference")
    )
    recorder = MetricsRecorder()
    flusher = recorder.start_flusher(text)
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(settings, dispatcher, lambda: healthy(text), recorder), inference
    )
    service = ManagementService(settings, text, model_store(settings), frames=clients.frames)
    servicer = ManagementServicer(service, ManagementReads(frames, dispatcher))
    management = grpc.aio.server(
        interceptors=interceptors("management"), options=server_options(settings, "management")
    )
    management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, management
    )
    credentials = server_credentials(settings)
    for which, server in (("inference", inference), ("management", management)):
        host, port = settings.grpc_bind(which)
        if credentials is None:
            server.add_insecure_port(target(host, port))
        else:
            server.add_secure_port(target(host, port), credentials)
    return Servers(inference, management, dispatcher, frames, clients, servicer, flusher)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``certificate_file``/``private_key_file`` when
    ``enable_grpc_ssl`` (validated at load: both readable), else None (plaintext)."""
    if not settings.enable_grpc_ssl:
        return None
    assert settings.certificate_file is not None and settings.private_key_file is not None
    key = settings.private_key_file.read_bytes()
    chain = settings.certificate_file.read_bytes()
    return grpc.ssl_server_credentials([(key, chain)])


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve both ports until ``stop`` is set (default: until SIGTERM or SIGINT), then
    stop gracefully (``stop_grace`` seconds for the calls in flight)."""
    stop = stop or _stop_on_signals()
    servers = build(settings)
    await servers.start()
    log.info(
        "gRPC inference on %s, management on %s",
        target(*settings.grpc_bind("inference")),
        target(*settings.grpc_bind("management")),
    )
    try:
        await stop.wait()
        log.info("stopping: %d s for the calls in flight", settings.stop_grace)
        await servers.stop(settings.stop_grace)
    finally:
        await servers.close()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop
