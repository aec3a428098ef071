"""The gRPC servicers over fakeredis, called as grpc.aio calls them: TorchServe's status
mapping, proto3 zero values as "not given", the same JSON text as the HTTP management
API, the model-API switch, token checks (Ping exempt), and the parts Predictions builds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import fakeredis
import grpc
import grpc.aio
import pytest
from falcon import testing
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2

from control.archives.store import ModelStore
from control.core import keys
from control.core.dispatch import Delivery, NoWorker, QueueFull
from control.core.envelope import Part, Reply
from control.core.errors import AUTHORIZATION_FAILED, ModelNotFoundException
from control.core.registry import Registry
from control.core.settings import Settings
from control.grpc.auth import TokenInterceptor
from control.grpc.inference import InferenceServicer, request_parts
from control.grpc.management import (
    MODEL_API_DISABLED,
    ManagementServicer,
    list_params,
    register_params,
    scale_params,
)
from control.grpc.protos import inference_pb2, management_pb2
from control.grpc.status import grpc_code
from control.http.auth import KeyStore, TokenAuth
from control.inference.api import no_worker_message
from control.management.reads import ManagementReads
from control.management.service import ManagementService
from tests.support.asgi import async_twin

SC = grpc.StatusCode


class Aborted(Exception):
    """What FakeContext.abort raises (grpc.aio raises AbortError; the tests read this)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers use."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        error = grpc.aio.AbortError()
        error.__cause__ = Aborted(code, details)
        raise error


def call(coro: Awaitable[Any]) -> Any:
    return asyncio.run(_run(coro))


async def _run(coro: Awaitable[Any]) -> Any:
    return await coro


def aborted(coro: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The code and details a call was closed with (it must be closed with an error)."""
    with pytest.raises(grpc.aio.AbortError) as info:
        call(coro)
    cause = info.value.__cause__
    assert isinstance(cause, Aborted)
    return cause.code, cause.details


# -- the status table -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("http", "code"),
    [
        (200, SC.OK), (202, SC.OK), (400, SC.INVALID_ARGUMENT), (401, SC.UNAUTHENTICATED),
        (403, SC.PERMISSION_DENIED), (404, SC.NOT_FOUND), (405, SC.FAILED_PRECONDITION),
        (408, SC.FAILED_PRECONDITION), (409, SC.ABORTED), (413, SC.RESOURCE_EXHAUSTED),
        (416, SC.OUT_OF_RANGE), (429, SC.RESOURCE_EXHAUSTED), (499, SC.CANCELLED),
        (500, SC.INTERNAL), (501, SC.UNIMPLEMENTED), (503, SC.UNAVAILABLE),
        (504, SC.DEADLINE_EXCEEDED), (507, SC.INTERNAL), (302, SC.INTERNAL),
    ],
)  # fmt: skip
def test_http_statuses_map_to_torchserves_grpc_codes(http: int, code: grpc.StatusCode) -> None:
    assert grpc_code(http) == code


# -- proto3 zero values ---------------------------------------------------------------


def test_register_zero_values_are_not_given_but_booleans_are() -> None:
    params = register_params(management_pb2.RegisterModelRequest(url="noop.mar"))
    assert params.text("url") == "noop.mar"
    for name in ("model_name", "handler", "runtime", "batch_size", "initial_workers",
                 "max_batch_delay", "response_timeout", "startup_timeout"):  # fmt: skip
        assert params.text(name) is None, name
    assert params.boolean("synchronous", True) is False  # gRPC's default, unlike HTTP's
    given = register_params(
        management_pb2.RegisterModelRequest(
            url="noop.mar", initial_workers=2, batch_size=4, synchronous=True, runtime="python"
        )
    )
    assert (given.integer("initial_workers", 0), given.integer("batch_size", 0)) == (2, 4)
    assert given.boolean("synchronous", False) is True and given.text("runtime") == "python"


def test_scale_and_list_zero_values_take_the_http_defaults() -> None:
    params = scale_params(management_pb2.ScaleWorkerRequest(model_name="noop"))
    assert params.text("min_worker") is None and params.text("max_worker") is None
    assert params.boolean("synchronous", True) is False
    assert list_params(management_pb2.ListModelsRequest()).text("limit") is None
    page = list_params(management_pb2.ListModelsRequest(limit=5, next_page_token=10))
    assert (page.integer("limit", 0), page.integer("next_page_token", 0)) == (5, 10)


# -- management -------------------------------------------------------------------------


def servicer_for(settings: Settings, redis_client: fakeredis.FakeRedis) -> ManagementServicer:
    store = ModelStore(settings.model_store, settings.allowed_urls)
    service = ManagementService(settings, redis_client, store)
    return ManagementServicer(service, ManagementReads(async_twin(redis_client)))


@pytest.fixture
def mgmt(settings: Settings, redis_client: fakeredis.FakeRedis) -> ManagementServicer:
    return servicer_for(settings, redis_client)


def msg(coro: Awaitable[management_pb2.ManagementResponse]) -> str:
    return str(call(coro).msg)


def test_management_answers_the_http_apis_json_text(
    mgmt: ManagementServicer, client: testing.TestClient
) -> None:
    ctx: Any = FakeContext()
    registered = msg(mgmt.RegisterModel(management_pb2.RegisterModelRequest(url="noop.mar"), ctx))
    assert registered == (
        '{\n  "status": "Model \\"noop\\" Version: 1.0 registered with 0 initial workers. '
        'Use scale workers API to add workers for the model."\n}'
    )
    described = msg(mgmt.DescribeModel(management_pb2.DescribeModelRequest(model_name="noop"), ctx))
    assert described == client.simulate_get("/models/noop").text.rstrip("\n")
    listed = msg(mgmt.ListModels(management_pb2.ListModelsRequest(), ctx))
    assert listed == client.simulate_get("/models").text.rstrip("\n")
    assert '"modelName": "noop"' in listed
    paged = msg(mgmt.ListModels(management_pb2.ListModelsRequest(limit=1), ctx))
    assert paged == client.simulate_get("/models?limit=1").text.rstrip("\n")


def test_scale_zero_values_mean_one_worker(
    mgmt: ManagementServicer, redis_client: fakeredis.FakeRedis
) -> None:
    ctx: Any = FakeContext()
    call(mgmt.RegisterModel(management_pb2.RegisterModelRequest(url="noop.mar"), ctx))
    answer = msg(mgmt.ScaleWorker(management_pb2.ScaleWorkerRequest(model_name="noop"), ctx))
    assert answer == '{\n  "status": "Processing worker updates..."\n}'
    record = Registry(redis_client).get("noop")
    assert (record.min_workers, record.max_workers) == (1, 1)
    call(mgmt.ScaleWorker(management_pb2.ScaleWorkerRequest(model_name="noop", min_worker=2), ctx))
    record = Registry(redis_client).get("noop")
    assert (record.min_workers, record.max_workers) == (2, 2)


def test_set_default_and_unregister_answer_their_status(mgmt: ManagementServicer) -> None:
    ctx: Any = FakeContext()
    for url in ("noop.mar", "noop_v2.mar"):
        call(mgmt.RegisterModel(management_pb2.RegisterModelRequest(url=url), ctx))
    request = management_pb2.SetDefaultRequest(model_name="noop", model_version="2.0")
    assert msg(mgmt.SetDefault(request, ctx)) == (
        '{\n  "status": "Default version successfully updated for model \\"noop\\" to \\"2.0\\""\n}'
    )
    gone = management_pb2.UnregisterModelRequest(model_name="noop", model_version="1.0")
    assert (
        msg(mgmt.UnregisterModel(gone, ctx)) == '{\n  "status": "Model \\"noop\\" unregistered"\n}'
    )


def test_management_errors_carry_the_http_message_and_the_exception_name(
    mgmt: ManagementServicer,
) -> None:
    ctx: Any = FakeContext()
    assert aborted(
        mgmt.DescribeModel(management_pb2.DescribeModelRequest(model_name="x"), ctx)
    ) == (
        SC.NOT_FOUND,
        "Model not found: x\nModelNotFoundException",
    )
    assert aborted(mgmt.RegisterModel(management_pb2.RegisterModelRequest(), ctx)) == (
        SC.INVALID_ARGUMENT,
        "Parameter url is required.\nBadRequestException",
    )
    bad_runtime = management_pb2.RegisterModelRequest(url="noop.mar", runtime="cobol")
    code, _ = aborted(mgmt.RegisterModel(bad_runtime, ctx))
    assert code == SC.INVALID_ARGUMENT
    missing = management_pb2.SetDefaultRequest(model_name="x", model_version="1.0")
    assert aborted(mgmt.SetDefault(missing, ctx))[0] == SC.NOT_FOUND


def test_register_and_unregister_need_the_model_api(
    settings: Settings, redis_client: fakeredis.FakeRedis
) -> None:
    mgmt = servicer_for(settings.replace(enable_model_api=False), redis_client)
    ctx: Any = FakeContext()
    register = management_pb2.RegisterModelRequest(url="noop.mar")
    assert aborted(mgmt.RegisterModel(register, ctx)) == (SC.PERMISSION_DENIED, MODEL_API_DISABLED)
    unregister = management_pb2.UnregisterModelRequest(model_name="noop")
    assert aborted(mgmt.UnregisterModel(unregister, ctx)) == (
        SC.PERMISSION_DENIED,
        MODEL_API_DISABLED,
    )
    assert redis_client.zcard(keys.MODELS) == 0  # nothing was registered


# -- inference --------------------------------------------------------------------------


class FakeDispatcher:
    """Records what ``send`` got; answers with ``outcome`` (a Reply or an exception)."""

    def __init__(self, outcome: Reply | Exception) -> None:
        self.outcome = outcome
        self.sent: list[tuple[str, str | None, tuple[Part, ...]]] = []

    async def send(
        self, model: str, version: str | None, parts: tuple[Part, ...], *args: Any, **kw: Any
    ) -> Delivery:
        self.sent.append((model, version, parts))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return Delivery(self.outcome, 0.0, "1.0")


def predict(
    outcome: Reply | Exception, settings: Settings | None = None, **request: Any
) -> tuple[Callable[[], Awaitable[Any]], FakeDispatcher]:
    dispatcher = FakeDispatcher(outcome)
    servicer = InferenceServicer(settings or Settings(), dispatcher, lambda: True)  # type: ignore[arg-type]
    message = inference_pb2.PredictionsRequest(**request)
    ctx: Any = FakeContext()
    return (lambda: servicer.Predictions(message, ctx)), dispatcher


def test_predictions_send_one_part_per_input_key_and_answer_the_body() -> None:
    run, dispatcher = predict(
        Reply(200, b"[0.9]"), model_name="noop", input={"data": b"\xff\x00", "extra": b"x"}
    )
    assert call(run()).prediction == b"[0.9]"
    [(model, version, parts)] = dispatcher.sent
    assert (model, version) == ("noop", None)
    assert sorted(parts, key=lambda p: p.name) == [
        Part("data", "", b"\xff\x00"),
        Part("extra", "", b"x"),
    ]
    request = inference_pb2.PredictionsRequest(input={"body": b"{}"})
    assert request_parts(request) == (Part("body", "", b"{}"),)


class Counted:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def inference(self, model: str, version_label: str, latency_us: float, queue_us: float) -> None:
        assert latency_us >= 0 and queue_us >= 0
        self.calls.append((model, version_label))


def test_answered_predictions_are_counted_as_the_http_ports_are() -> None:
    counted = Counted()
    ctx: Any = FakeContext()
    servicer = InferenceServicer(
        Settings(), FakeDispatcher(Reply(200, b"ok")), lambda: True, counted
    )  # type: ignore[arg-type]
    call(servicer.Predictions(inference_pb2.PredictionsRequest(model_name="noop"), ctx))
    request = inference_pb2.PredictionsRequest(model_name="noop", model_version="2.0")
    call(servicer.Predictions(request, ctx))
    assert counted.calls == [("noop", "default"), ("noop", "2.0")]
    failing = InferenceServicer(Settings(), FakeDispatcher(NoWorker("x")), lambda: True, counted)  # type: ignore[arg-type]
    aborted(failing.Predictions(request, ctx))
    assert len(counted.calls) == 2  # refusals are not inferences


def test_predictions_name_the_version_when_given() -> None:
    run, dispatcher = predict(Reply(200, b"ok"), model_name="noop", model_version="2.0")
    call(run())
    assert dispatcher.sent[0][:2] == ("noop", "2.0")


def test_prediction_failures_map_to_grpc_codes() -> None:
    run, _ = predict(NoWorker("x"), model_name="noop")
    assert aborted(run()) == (
        SC.UNAVAILABLE,
        f"{no_worker_message('noop', None)}\nServiceUnavailableException",
    )
    run, _ = predict(ModelNotFoundException("Model not found: nope"), model_name="nope")
    assert aborted(run()) == (SC.NOT_FOUND, "Model not found: nope\nModelNotFoundException")
    run, _ = predict(QueueFull("x"), settings=Settings(queue_full_status=429), model_name="noop")
    assert aborted(run())[0] == SC.RESOURCE_EXHAUSTED
    run, _ = predict(Reply(507, error="out of memory"), model_name="noop")
    assert aborted(run()) == (SC.INTERNAL, "out of memory")
    run, _ = predict(Reply(400, error="bad input"), model_name="noop")
    assert aborted(run()) == (SC.INVALID_ARGUMENT, "bad input")


def test_ping_answers_the_json_of_http_ping_even_when_unhealthy() -> None:
    ctx: Any = FakeContext()
    for healthy, word in ((True, "Healthy"), (False, "Unhealthy")):
        servicer = InferenceServicer(Settings(), FakeDispatcher(Reply(200)), lambda h=healthy: h)  # type: ignore[arg-type,misc]
        answer = call(servicer.Ping(empty_pb2.Empty(), ctx))
        assert answer.health == f'{{\n  "status": "{word}"\n}}'


class StreamingDispatcher:
    """Answers ``stream`` with ``replies`` (pieces then a final reply), or raises
    ``refusal`` before the first; records each call and whether its stream was closed."""

    def __init__(self, replies: list[Reply], refusal: Exception | None = None) -> None:
        self.replies = replies
        self.refusal = refusal
        self.calls: list[dict[str, Any]] = []
        self.closed = 0

    async def stream(
        self, model: str, version: str | None, parts: tuple[Part, ...], *args: Any, **kw: Any
    ) -> AsyncIterator[Delivery]:
        headers = args[0] if args else None
        self.calls.append(
            {"model": model, "version": version, "parts": parts, "headers": headers, **kw}
        )
        try:
            if self.refusal is not None:
                raise self.refusal
            for reply in self.replies:
                yield Delivery(reply, 0.0, "1.0")
        finally:
            self.closed += 1


def stream_of(dispatcher: StreamingDispatcher, **request: Any) -> Awaitable[list[Any]]:
    servicer = InferenceServicer(Settings(), dispatcher, lambda: True)  # type: ignore[arg-type]
    ctx: Any = FakeContext()

    async def collect() -> list[Any]:
        stream = servicer.StreamPredictions(inference_pb2.PredictionsRequest(**request), ctx)
        return [message async for message in stream]

    return collect()


def test_stream_predictions_sends_one_message_per_piece_then_the_final_one() -> None:
    pieces = [Reply(200, b"hello", more=True)] * 3 + [Reply(200, b"hello world ")]
    dispatcher = StreamingDispatcher(pieces)
    messages = call(stream_of(dispatcher, model_name="llm", input={"data": b"hi"}))
    assert [m.prediction for m in messages] == [b"hello"] * 3 + [b"hello world "]
    [sent] = dispatcher.calls
    assert (sent["model"], sent["version"], sent["kind"]) == ("llm", None, "stream")
    assert sent["parts"] == (Part("data", "", b"hi"),)
    assert dispatcher.closed == 1


def test_stream_predictions_errors_close_the_call_with_their_code() -> None:
    # Refused before any piece: the HTTP port's 503, so UNAVAILABLE.
    dispatcher = StreamingDispatcher([], refusal=NoWorker("x"))
    code, details = aborted(stream_of(dispatcher, model_name="llm"))
    assert code == SC.UNAVAILABLE and details.startswith('Model "llm" has no worker')
    # A handler that fails after a piece: the worker's status and words.
    dispatcher = StreamingDispatcher([Reply(200, b"a", more=True), Reply(507, error="oom")])
    assert aborted(stream_of(dispatcher, model_name="llm")) == (SC.INTERNAL, "oom")
    assert dispatcher.closed == 1


class SequenceDispatcher(StreamingDispatcher):
    """Streams ``replies`` for model ``llm``; refuses any other model (no worker)."""

    async def stream(
        self, model: str, version: str | None, parts: tuple[Part, ...], *args: Any, **kw: Any
    ) -> AsyncIterator[Delivery]:
        self.refusal = None if model == "llm" else NoWorker("x")
        async for delivery in super().stream(model, version, parts, *args, **kw):
            yield delivery


def test_stream_predictions2_streams_each_request_and_reports_errors_in_the_stream() -> None:
    pieces = [Reply(200, b"a", more=True), Reply(200, b"b")]
    dispatcher = SequenceDispatcher(pieces)
    servicer = InferenceServicer(Settings(), dispatcher, lambda: True)  # type: ignore[arg-type]
    ctx: Any = FakeContext()

    async def requests() -> AsyncIterator[inference_pb2.PredictionsRequest]:
        for model in ("llm", "nope", "llm"):
            yield inference_pb2.PredictionsRequest(model_name=model, sequence_id="seq-1")

    async def collect() -> list[Any]:
        return [m async for m in servicer.StreamPredictions2(requests(), ctx)]

    messages = call(collect())
    assert [(m.prediction, m.sequence_id, m.HasField("status")) for m in messages] == [
        (b"a", "seq-1", False), (b"b", "seq-1", False),
        (b"", "seq-1", True),
        (b"a", "seq-1", False), (b"b", "seq-1", False),
    ]  # fmt: skip
    error = messages[2].status
    assert error.code == SC.UNAVAILABLE.value[0]
    assert error.message.startswith('Model "nope" has no worker')
    info = error_details_pb2.ErrorInfo()
    assert error.details[0].Unpack(info) and info.reason == "ServiceUnavailableException"
    # The handler sees the sequence, as TorchServe's sequence header.
    assert [c["model"] for c in dispatcher.calls] == ["llm", "nope", "llm"]
    assert all(c["headers"]["ts_request_sequence_id"] == "seq-1" for c in dispatcher.calls)
    assert all(c["kind"] == "stream" for c in dispatcher.calls)
    assert dispatcher.closed == 3


# -- token authorization ----------------------------------------------------------------


class Details:
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


PREDICT = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
PING = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping"


@pytest.fixture
def keys_issued(
    redis_client: fakeredis.FakeRedis, tmp_path: Path
) -> tuple[KeyStore, dict[str, str]]:
    store = KeyStore(redis_client, tmp_path / "key_file.json", 60)
    return store, store.issue_all()


def intercept(
    redis_client: fakeredis.FakeRedis,
    store: KeyStore,
    method: str,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[Any, Any]:
    """(the handler the interceptor returned, the real one)."""
    real: Any = grpc.unary_unary_rpc_method_handler(lambda request, context: b"served")

    async def run() -> Any:
        auth = TokenAuth(store, "inference", client=async_twin(redis_client))
        interceptor = TokenInterceptor(auth, "inference")

        async def continuation(details: Any) -> Any:
            return real

        return await interceptor.intercept_service(continuation, Details(method, metadata))  # type: ignore[arg-type]

    return call(run()), real


def test_calls_need_the_ports_key(
    redis_client: fakeredis.FakeRedis, keys_issued: tuple[KeyStore, dict[str, str]]
) -> None:
    store, fresh = keys_issued
    good = (("authorization", f"Bearer {fresh['inference']}"),)
    handler, real = intercept(redis_client, store, PREDICT, good)
    assert handler is real
    for metadata in ((), (("authorization", f"Bearer {fresh['management']}"),),
                     (("authorization", fresh["inference"]),)):  # fmt: skip
        handler, real = intercept(redis_client, store, PREDICT, metadata)
        assert handler is not real
        assert not handler.request_streaming and not handler.response_streaming
        refused = handler.unary_unary(b"", FakeContext())
        assert aborted(refused) == (SC.PERMISSION_DENIED, AUTHORIZATION_FAILED)


def test_ping_needs_no_key(
    redis_client: fakeredis.FakeRedis, keys_issued: tuple[KeyStore, dict[str, str]]
) -> None:
    store, _ = keys_issued
    handler, real = intercept(redis_client, store, PING, ())
    assert handler is real
