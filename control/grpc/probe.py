"""Is a gRPC port up? A ``Ping`` answered, whatever it says (the stack's readiness check)."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from control.grpc.protos import inference_pb2_grpc

#: Codes that mean no gRPC server answered.
_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def answers_grpc(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when ``host:port`` answers an inference ``Ping`` within ``timeout`` seconds,
    with any status (the management port answers UNIMPLEMENTED: it is up too).

    Wildcard addresses are probed on loopback."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 (probe only)
    host = wildcard.get(host, host)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.Ping(empty_pb2.Empty(), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code() not in _DOWN
    return True
