"""TorchServe's gRPC APIs over real Redis, a real supervisor and real worker processes,
called by a client built from the generated stubs: register, scale, describe, list,
predict, set-default and unregister, with tokens off and on, and the gRPC codes the
status table gives (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, UNAVAILABLE)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import empty_pb2

from control.core.errors import AUTHORIZATION_FAILED
from control.core.settings import Settings
from control.grpc.protos import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)
from control.http.auth import KeyStore
from tests.support.archives import build_mar
from tests.support.grpc import grpc_process
from tests.support.processes import supervisor_process

SC = grpc.StatusCode
#: Deadlines of the client's calls (gRPC has none by default): a synchronous register
#: waits for a worker process to load its model.
SLOW_S = 90.0
FAST_S = 20.0

VERSIONED = """
def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        value = row.get("data") or row.get("body")
        if value == b"raise":
            raise ValueError("handler bug")
        out.append(b"%s:" + value)
    return out
"""


def archive(store: Path, name: str, version: str) -> str:
    handler = VERSIONED.replace("%s", version)
    build_mar(store / f"{name}-{version}.mar", name, version,
              extra={"noop_handler.py": handler.encode()})  # fmt: skip
    return f"{name}-{version}.mar"


class Client:
    """Stubs of both services over two channels, sending ``metadata`` with every call."""

    def __init__(self, settings: Settings, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        host, port = settings.grpc_bind("inference")
        self._inference = grpc.insecure_channel(f"{host}:{port}")
        host, port = settings.grpc_bind("management")
        self._management = grpc.insecure_channel(f"{host}:{port}")
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(self._inference)
        self.management = management_pb2_grpc.ManagementAPIsServiceStub(self._management)
        self.metadata = metadata

    def manage(self, method: str, timeout: float = FAST_S, **fields: Any) -> Any:
        """The JSON of a management call's ``msg``."""
        request = getattr(management_pb2, f"{_request_name(method)}")(**fields)
        answer = getattr(self.management, method)(request, timeout=timeout, metadata=self.metadata)
        return json.loads(answer.msg)

    def predict(self, model: str, version: str = "", **inputs: bytes) -> bytes:
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input=inputs
        )
        answer = self.inference.Predictions(request, timeout=FAST_S, metadata=self.metadata)
        return bytes(answer.prediction)

    def close(self) -> None:
        self._inference.close()
        self._management.close()


def _request_name(method: str) -> str:
    return f"{method}Request"


def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    """The code and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details()


@pytest.fixture
def models(store: Path) -> Path:
    for version in ("1.0", "2.0"):
        archive(store, "echo", version)
    archive(store, "idle", "1.0")
    return store


@pytest.mark.parametrize("tokens", ["off", "on"])
def test_the_model_lifecycle_over_grpc(
    tokens: str, stack_settings: Settings, models: Path, tmp_path: Path, real_redis: redis.Redis
) -> None:
    settings = stack_settings.replace(disable_token_authorization=tokens == "off")
    metadata: dict[str, tuple[tuple[str, str], ...]] = {"inference": (), "management": ()}
    if tokens == "on":
        fresh = KeyStore(real_redis, settings.key_file, 60).issue_all()
        metadata = {role: (("authorization", f"Bearer {fresh[role]}"),) for role in metadata}
    with (
        supervisor_process(settings, tmp_path / "hosts", "grpc-host"),
        grpc_process(settings, tmp_path / "grpc") as served,
    ):
        mgmt, inf = Client(served, metadata["management"]), Client(served, metadata["inference"])
        try:
            _lifecycle(mgmt, inf)
        finally:
            mgmt.close()
            inf.close()


def _lifecycle(mgmt: Client, inf: Client) -> None:
    health = inf.inference.Ping(empty_pb2.Empty(), timeout=FAST_S)
    assert json.loads(health.health) == {"status": "Healthy"}
    assert mgmt.manage(
        "RegisterModel", SLOW_S, url="echo-1.0.mar", initial_workers=1, synchronous=True
    ) == {"status": 'Model "echo" Version: 1.0 registered with 1 initial workers'}
    mgmt.manage("RegisterModel", SLOW_S, url="echo-2.0.mar", initial_workers=1, synchronous=True)
    # initial_workers 0 is "not given": default_workers_per_model, 0 here.
    assert "0 initial workers" in mgmt.manage("RegisterModel", url="idle-1.0.mar")["status"]
    listed = mgmt.manage("ListModels")
    assert [m["modelName"] for m in listed["models"]] == ["echo", "idle"]

    assert inf.predict("echo", data=b"hi") == b"1.0:hi"  # the default: the first registered
    assert inf.predict("echo", "2.0", data=b"hi") == b"2.0:hi"
    assert inf.predict("echo", body=b"raw") == b"1.0:raw"
    assert mgmt.manage("SetDefault", model_name="echo", model_version="2.0") == {
        "status": 'Default version successfully updated for model "echo" to "2.0"'
    }
    assert inf.predict("echo", data=b"hi") == b"2.0:hi"

    # min_worker 2, max_worker 0 ("not given": min_worker), synchronously.
    scaled = mgmt.manage(
        "ScaleWorker", SLOW_S, model_name="echo", model_version="1.0", min_worker=2,
        synchronous=True,
    )  # fmt: skip
    assert scaled == {"status": "Workers scaled to 2 for model: echo, version: 1.0"}
    [described] = mgmt.manage("DescribeModel", model_name="echo", model_version="1.0")
    assert (described["minWorkers"], described["maxWorkers"]) == (2, 2)
    assert len(described["workers"]) == 2
    [default] = mgmt.manage("DescribeModel", model_name="echo")
    assert default["modelVersion"] == "2.0"

    # The status table.
    code, details = refused(lambda: inf.predict("nope", data=b"x"))
    assert (code, details) == (SC.NOT_FOUND, "Model not found: nope\nModelNotFoundException")
    code, _ = refused(lambda: mgmt.manage("DescribeModel", model_name="nope"))
    assert code == SC.NOT_FOUND
    code, details = refused(lambda: mgmt.manage("RegisterModel", url="echo-1.0.mar",
                                                runtime="cobol"))  # fmt: skip
    assert (code, details) == (
        SC.INVALID_ARGUMENT, "Invalid RuntimeType value: cobol\nBadRequestException"
    )  # fmt: skip
    code, details = refused(lambda: inf.predict("idle", data=b"x"))
    assert code == SC.UNAVAILABLE
    assert details.startswith('Model "idle" has no worker to serve inference request.')
    # A handler that raises: TorchServe's 503 "Prediction failed", so UNAVAILABLE.
    assert refused(lambda: inf.predict("echo", data=b"raise")) == (
        SC.UNAVAILABLE,
        "Prediction failed",
    )
    # StreamPredictions of a handler that does not stream: its one answer.
    stream = inf.inference.StreamPredictions(
        inference_pb2.PredictionsRequest(model_name="echo", input={"data": b"s"}),
        timeout=FAST_S, metadata=inf.metadata,
    )  # fmt: skip
    assert [bytes(m.prediction) for m in stream] == [b"2.0:s"]
    # StreamPredictions2: each request answered in turn, an error inside the stream.
    sequence = [
        inference_pb2.PredictionsRequest(model_name=m, input={"data": b"q"}, sequence_id="s1")
        for m in ("echo", "nope", "echo")
    ]
    stream = inf.inference.StreamPredictions2(iter(sequence), timeout=FAST_S,
                                              metadata=inf.metadata)  # fmt: skip
    answers = list(stream)
    assert [(bytes(a.prediction), a.sequence_id) for a in answers] == [
        (b"2.0:q", "s1"), (b"", "s1"), (b"2.0:q", "s1"),
    ]  # fmt: skip
    assert answers[1].status.code == SC.NOT_FOUND.value[0]
    assert answers[1].status.message == "Model not found: nope"

    for name, version in (("echo", "1.0"), ("echo", "2.0"), ("idle", "")):
        answer = mgmt.manage("UnregisterModel", SLOW_S, model_name=name, model_version=version)
        assert answer == {"status": f'Model "{name}" unregistered'}
    assert mgmt.manage("ListModels") == {"models": []}


#: TorchServe's streaming test handler: three intermediate results, then the final one.
HELLO = """
from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    for _ in range(3):
        send_intermediate_predict_response(
            ["hello"], context.request_ids, "Intermediate Prediction success", 200, context
        )
    return ["hello world "]
"""


def test_stream_predictions_sends_each_intermediate_result(
    stack_settings: Settings, store: Path, tmp_path: Path
) -> None:
    build_mar(store / "hello.mar", "hello", extra={"noop_handler.py": HELLO.encode()})
    with (
        supervisor_process(stack_settings, tmp_path / "hosts", "grpc-host"),
        grpc_process(stack_settings, tmp_path / "grpc") as served,
    ):
        client = Client(served)
        try:
            registered = client.manage(
                "RegisterModel", SLOW_S, url="hello.mar", initial_workers=1, synchronous=True
            )
            assert registered["status"].startswith('Model "hello" Version: 1.0 registered')
            for _ in range(2):  # and again: nothing of the first stream is left behind
                request = inference_pb2.PredictionsRequest(model_name="hello", input={"data": b"x"})
                stream = client.inference.StreamPredictions(request, timeout=FAST_S)
                messages = [bytes(m.prediction) for m in stream]
                assert messages == [b"hello", b"hello", b"hello", b"hello world "]
            # Predictions of a streaming handler: its first piece, as TorchServe's.
            assert client.predict("hello", data=b"x") == b"hello"
            # StreamPredictions2: the pieces of each request in turn.
            requests = [
                inference_pb2.PredictionsRequest(model_name="hello", sequence_id=f"s{i}")
                for i in range(2)
            ]
            answers = client.inference.StreamPredictions2(iter(requests), timeout=FAST_S)
            assert [(bytes(a.prediction), a.sequence_id) for a in answers] == [
                (piece, f"s{i}")
                for i in range(2)
                for piece in (b"hello", b"hello", b"hello", b"hello world ")
            ]
        finally:
            client.close()


def test_keys_and_the_model_api_switch(
    stack_settings: Settings, real_redis: redis.Redis, tmp_path: Path
) -> None:
    settings = stack_settings.replace(
        disable_token_authorization=False, enable_model_api=False, max_request_size=4096
    )
    fresh = KeyStore(real_redis, settings.key_file, 60).issue_all()
    with grpc_process(settings, tmp_path / "grpc") as served:
        clients: dict[str, Client] = {}
        for name, metadata in {
            "none": (),
            "inference": (("authorization", f"Bearer {fresh['inference']}"),),
            "management": (("authorization", f"Bearer {fresh['management']}"),),
            "bad": (("authorization", "Bearer not-a-key"),),
        }.items():
            clients[name] = Client(served, metadata)
        try:
            _keys(clients)
        finally:
            for client in clients.values():
                client.close()


def _keys(clients: dict[str, Client]) -> None:
    denied = (SC.PERMISSION_DENIED, AUTHORIZATION_FAILED)
    for who in ("none", "bad", "management"):  # the management key is not the inference key
        assert refused(lambda c=clients[who]: c.predict("echo", data=b"x")) == denied
    for who in ("none", "bad", "inference"):
        assert refused(lambda c=clients[who]: c.manage("ListModels")) == denied
    # Health probes carry no secrets.
    health = clients["none"].inference.Ping(empty_pb2.Empty(), timeout=FAST_S)
    assert json.loads(health.health) == {"status": "Healthy"}
    # With the right key the call goes through (to the registry's 404).
    code, _ = refused(lambda: clients["inference"].predict("echo", data=b"x"))
    assert code == SC.NOT_FOUND
    # max_request_size bounds what the port receives.
    code, _ = refused(lambda: clients["inference"].predict("echo", data=b"x" * 8192))
    assert code == SC.RESOURCE_EXHAUSTED
    assert clients["management"].manage("ListModels") == {"models": []}
    model_api = (SC.PERMISSION_DENIED, "Model API disabled")
    manager = clients["management"]
    assert refused(lambda: manager.manage("RegisterModel", url="echo-1.0.mar")) == model_api
    assert refused(lambda: manager.manage("UnregisterModel", model_name="echo")) == model_api


def test_enable_grpc_ssl_serves_both_ports_over_tls(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """``enable_grpc_ssl`` with TorchServe's ``certificate_file``/``private_key_file``: a
    client that trusts the certificate talks TLS to both ports; a plaintext one cannot."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    settings = stack_settings.replace(
        enable_grpc_ssl=True, certificate_file=cert, private_key_file=key
    )
    with grpc_process(settings, tmp_path / "grpc") as served:
        trusted = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        for which in ("inference", "management"):
            port = served.grpc_bind(which)[1]
            with grpc.secure_channel(f"localhost:{port}", trusted) as channel:
                if which == "inference":
                    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
                    health = stub.Ping(empty_pb2.Empty(), timeout=FAST_S).health
                    assert json.loads(health) == {"status": "Healthy"}
                else:
                    mstub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
                    answer = mstub.ListModels(management_pb2.ListModelsRequest(), timeout=FAST_S)
                    assert json.loads(answer.msg) == {"models": []}
            with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
                stub = inference_pb2_grpc.InferenceAPIsServiceStub(plain)
                code, _ = refused(lambda stub=stub: stub.Ping(empty_pb2.Empty(), timeout=5))
                assert code == SC.UNAVAILABLE
