"""One batch through a loaded handler: decoding, replies, errors
(docs/torchserve-compat.md#inference-api)."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.handlers import isolated_imports, make_model_dir, make_request, make_spec
from workers.handling import (
    HandlerFailure,
    InferenceRequest,
    LoadedModel,
    Parameter,
    load_handler,
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path) -> Iterator[None]:
    with isolated_imports(tmp_path):
        yield


def _load(tmp_path: Path, handler_file: str, handler: str | None = None) -> LoadedModel:
    model_dir = make_model_dir(tmp_path, handler_file)
    return load_handler(model_dir, make_spec(handler or handler_file, batch_size=8), None)


def _seen(request: InferenceRequest, tmp_path: Path) -> tuple[dict[str, Any], Any]:
    """What ``function_handler`` received for ``request``: its data row and its context."""
    loaded = _load(tmp_path, "function_handler.py")
    loaded.handle([request])
    data, context = sys.modules["function_handler"].calls[-1]
    return data[0], context


# -- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "raw", "expected"),
    [
        ("application/json", b'{"a": [1, 2]}', {"a": [1, 2]}),
        ("application/json; charset=utf-8", b"[1]", [1]),
        ("application/json", b"{not json", bytearray(b"{not json")),
        ("application/json", b"\xff\xfe", bytearray(b"\xff\xfe")),
        ("text/plain", "h\u00e9".encode(), "h\u00e9"),
        ("text/csv", b"a,b", "a,b"),
        ("text/plain", b"\xff", bytearray(b"\xff")),
        ("application/octet-stream", b"\x80\x03pickle", bytearray(b"\x80\x03pickle")),
        ("", b"raw", bytearray(b"raw")),
    ],
)
def test_parameter_decoding(
    tmp_path: Path, content_type: str, raw: bytes, expected: object
) -> None:
    row, _ = _seen(make_request("r1", raw, content_type), tmp_path)
    assert row == {"body": expected}
    assert type(row["body"]) is type(expected)


def test_multipart_parameters_last_duplicate_wins(tmp_path: Path) -> None:
    parameters = [
        Parameter("data", "image/png", b"\x89PNG"),
        Parameter("meta", "application/json", b'{"k": 1}'),
        Parameter("note", "text/plain", b"first"),
        Parameter("note", "text/plain", b"second"),
    ]
    request = make_request("r1", parameters=parameters, headers={"x-a": "1"})
    row, _ = _seen(request, tmp_path)
    assert row == {"data": bytearray(b"\x89PNG"), "meta": {"k": 1}, "note": "second"}


def test_request_headers_seen_by_the_handler(tmp_path: Path) -> None:
    request = make_request(
        "r1",
        parameters=[Parameter("data", "image/png", b"x"), Parameter("body", "text/plain", b"y")],
        headers={"x-a": "1", "url_path": "v1/chat", "body": "header wins"},
    )
    loaded = _load(tmp_path, "function_handler.py")
    headers: dict[str, Any] = {}

    def spy(data: Any, context: Any) -> list[Any]:
        headers.update(context.get_all_request_header(0))
        return ["ok"]

    loaded._entry_point = spy
    loaded.handle([request])
    assert headers == {
        "data": {"content-type": "image/png"},
        "body": "header wins",
        "x-a": "1",
        "explain": "False",
        "url_path": "v1/chat",
    }


# -- replies ----------------------------------------------------------------------------


def _one(loaded: LoadedModel, body: Any) -> bytes:
    return loaded.handle([make_request("r1", body)])[0].body


def test_output_serialisation(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "behaviour_handler.py")
    assert _one(loaded, {"mode": "bytes"}) == b"\x00\xffraw"
    assert _one(loaded, {"mode": "str"}) == "h\u00e9llo".encode()
    assert (
        _one(loaded, {"mode": "echo", "n": [1, 2]})
        == json.dumps({"mode": "echo", "n": [1, 2]}, indent=2).encode()
    )
    tensor = torch.load(io.BytesIO(_one(loaded, {"mode": "tensor"})), weights_only=True)
    assert torch.equal(tensor, torch.tensor([1.5, 2.5]))


def test_reply_defaults(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "behaviour_handler.py")
    reply = loaded.handle([make_request("r1", {"mode": "str"})])[0]
    assert (reply.status, reply.reason, reply.headers, reply.content_type) == (200, "", {}, None)


def test_per_request_status_headers_and_content_type(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "class_handler.py")
    batch = [
        make_request("r0", {}, headers={"x-status": "404", "x-phrase": "Nope"}),
        make_request("r1", {}, headers={"x-type": "application/json", "x-echo": "e1"}),
        make_request("r2", {}, headers={"url_path": "v2/x"}),
    ]
    replies = loaded.handle(batch)
    assert [(r.status, r.reason) for r in replies] == [(404, "Nope"), (200, ""), (200, "")]
    assert [r.content_type for r in replies] == [None, "application/json", None]
    assert [r.headers for r in replies] == [{}, {"x-echo": "e1"}, {}]
    assert [json.loads(r.body)["id"] for r in replies] == ["r0", "r1", "r2"]
    assert json.loads(replies[2].body)["url_path"] == "v2/x"


def test_per_batch_state_does_not_leak(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "class_handler.py")
    loaded.handle([make_request("r0", {}, headers={"x-status": "500", "x-echo": "e"})])
    reply = loaded.handle([make_request("r1", {})])[0]
    assert (reply.status, reply.headers) == (200, {})
    assert loaded.context.request_ids is None
    assert loaded.context.request_processor is None


def test_set_all_response_status(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "behaviour_handler.py")
    replies = loaded.handle([make_request("a", {"mode": "status"}), make_request("b", {})])
    assert [(r.status, r.reason) for r in replies] == [(202, "Accepted later")] * 2


def test_content_type_set_as_a_header(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "function_handler.py")

    def handler(data: Any, context: Any) -> list[Any]:
        context.set_response_header(0, "Content-Type", "text/csv")
        context.set_response_header(0, "x-count", 3)
        return ["a,b"]

    loaded._entry_point = handler
    reply = loaded.handle([make_request("r1", {})])[0]
    assert (reply.content_type, reply.headers) == ("text/csv", {"x-count": "3"})


def test_describe_reply_is_the_handler_output(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "function_handler.py")
    loaded._entry_point = lambda data, context: [{"describe": True}]
    request = make_request("d1", parameters=[], headers={"describe": "True"})
    assert json.loads(loaded.handle([request])[0].body) == {"describe": True}
    with pytest.raises(ValueError, match="never batched"):
        loaded.handle([request, make_request("r2", {})])


def test_empty_batch_is_a_caller_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        _load(tmp_path, "function_handler.py").handle([])


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "message"),
    [
        ("raise", 503, "Prediction failed"),
        ("memory", 507, "Out of resources"),
        ("cuda", 507, "Out of resources"),
        ("prediction", 422, "input rejected"),
        ("not_list", 503, "Invalid model predict output"),
        ("short", 503, "number of batch response mismatched"),
        ("unserialisable", 503, "Unsupported model output data type."),
    ],
)
def test_batch_failures(tmp_path: Path, mode: str, status: int, message: str) -> None:
    loaded = _load(tmp_path, "behaviour_handler.py")
    batch = [make_request("r1", {"mode": mode}), make_request("r2", {"mode": "x"})]
    with pytest.raises(HandlerFailure) as info:
        loaded.handle(batch)
    assert (info.value.status, info.value.message) == (status, message)
    assert loaded.context.request_processor is None


def test_handler_exception_is_the_cause(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "behaviour_handler.py")
    with pytest.raises(HandlerFailure) as info:
        loaded.handle([make_request("r1", {"mode": "raise"})])
    assert isinstance(info.value.__cause__, ValueError)


def test_prediction_exception_by_name_and_bad_codes(tmp_path: Path) -> None:
    class PredictionException(Exception):  # as a real TorchServe install defines it
        def __init__(self, message: str, error_code: object) -> None:
            super().__init__(message)
            self.message = message
            self.error_code = error_code

    loaded = _load(tmp_path, "function_handler.py")
    for code, expected in [(418, 418), (99, 500), ("400", 500)]:

        def handler(data: Any, context: Any, code: object = code) -> list[Any]:
            raise PredictionException("teapot", code)

        loaded._entry_point = handler
        with pytest.raises(HandlerFailure) as info:
            loaded.handle([make_request("r1", {})])
        assert (info.value.status, info.value.message) == (expected, "teapot")


def test_invalid_response_status_fails_the_batch(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "function_handler.py")

    def handler(data: Any, context: Any) -> list[Any]:
        context.set_response_status("201", "", 0)
        return ["x"]

    loaded._entry_point = handler
    with pytest.raises(HandlerFailure) as info:
        loaded.handle([make_request("r1", {})])
    assert (info.value.status, info.value.message) == (503, "Invalid model predict output")


# -- metrics ----------------------------------------------------------------------------


def test_prediction_time_recorded_per_batch(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "function_handler.py")
    loaded.handle([make_request("r1", {}), make_request("r2", {})])
    (metric,) = loaded.last_metrics
    assert (metric.name, metric.unit, metric.request_id) == ("PredictionTime", "ms", "r1,r2")
    assert metric.value >= 0
    assert metric.dimensions == {"ModelName": "tiny", "Level": "Model"}

    with pytest.raises(HandlerFailure):
        loaded._entry_point = lambda data, context: None
        loaded.handle([make_request("r3", {})])
    assert loaded.last_metrics == []
