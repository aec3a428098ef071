"""Is a gRPC port up? A ``Ping`` answered, whatever it says (the stack's readiness check)."""

from __future__ import annotations

import socket

import grpc
from google.protobuf import empty_pb2

from control.grpc.protos import inference_pb2_grpc

#: Codes that mean no gRPC server answered.
_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def answers_grpc(host: str, port: int, timeout: float = 2.0, tls: bool = False) -> bool:
    """True when ``host:port`` answers an inference ``Ping`` within ``timeout`` seconds,
    with any status (the management port answers UNIMPLEMENTED: it is up too). With
    ``tls`` (``enable_grpc_ssl``), a TCP connect: the probe cannot know which name the
    certificate is for, and a listening port is the server's.

    Wildcard addresses are probed on loopback."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 (probe only)
    host = wildcard.get(host, host)
    if tls:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.Ping(empty_pb2.Empty(), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code() not in _DOWN
    return True
