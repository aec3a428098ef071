"""The metrics port (8082): routes, content type, headers, OpenAPI, response counting."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import fakeredis
import falcon
import pytest
from falcon import testing
from openapi_spec_validator import validate

from control.core import keys
from control.http.common import REDIS_DOWN, new_app, new_wsgi_app
from control.http.openapi import load_description
from control.metrics.api import CountResponses, create_metrics_app
from control.metrics.recorder import CONTENT_TYPE, MetricsRecorder

NOT_FOUND = "Requested resource is not found, please refer to API document."
NOT_ALLOWED = "Requested method is not allowed, please refer to API document."
POSTMAN = re.compile(r'.*Requests2XX\{Level="Host",Hostname=".*",\} \d+\.\d+.*', re.DOTALL)


@pytest.fixture
def recorder() -> MetricsRecorder:
    return MetricsRecorder(hostname="myhost")


@pytest.fixture
def client(redis_client: fakeredis.FakeRedis, recorder: MetricsRecorder) -> testing.TestClient:
    return testing.TestClient(create_metrics_app(redis_client, recorder))


def assert_common_headers(result: testing.Result) -> None:
    uuid.UUID(result.headers["x-request-id"])
    assert result.headers["pragma"] == "no-cache"
    assert result.headers["cache-control"] == "no-cache; no-store, must-revalidate, private"
    assert result.headers["expires"] == "Thu, 01 Jan 1970 00:00:00 UTC"


def assert_error(result: testing.Result, code: int, type_: str, message: str) -> None:
    assert result.status_code == code, result.text
    body = {"code": code, "type": type_, "message": message}
    assert result.content == (json.dumps(body, indent=2) + "\n").encode()
    assert result.headers["content-type"] == "application/json"
    assert result.headers["connection"] == "close"
    assert_common_headers(result)


def type_lines(text: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]


def test_get_metrics(
    client: testing.TestClient, recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    recorder.request(200)
    recorder.flush(redis_client)
    for path in ("/metrics", "/metrics/"):
        result = client.simulate_get(path)
        assert result.status_code == 200
        assert result.headers["content-type"] == CONTENT_TYPE
        assert result.headers["connection"] == "keep-alive"
        assert_common_headers(result)
        assert POSTMAN.match(result.text)
        assert result.text.startswith("# HELP Requests2XX ")


def test_head_metrics_has_no_body(client: testing.TestClient) -> None:
    result = client.simulate_head("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"] == CONTENT_TYPE
    assert result.content == b""


def test_name_filter(client: testing.TestClient) -> None:
    one = client.simulate_get("/metrics", query_string="name[]=Requests4XX")
    assert type_lines(one.text) == ["Requests4XX"]
    two = client.simulate_get(
        "/metrics",
        query_string="name%5B%5D=ts_queue_latency_microseconds&name[]=ts_inference_requests_total",
    )
    assert type_lines(two.text) == ["ts_inference_requests_total", "ts_queue_latency_microseconds"]
    blank = client.simulate_get("/metrics", query_string="name[]=")
    assert blank.status_code == 200 and blank.text == ""
    other = client.simulate_get("/metrics", query_string="name=Requests4XX")
    assert "Requests2XX" in type_lines(other.text)  # only name[] filters


@pytest.mark.parametrize("path", ["/", "/api-description", "/api-description/"])
def test_api_description(client: testing.TestClient, path: str) -> None:
    method = "OPTIONS" if path == "/" else "GET"
    result = client.simulate_request(method, path)
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/json"
    assert result.content.endswith(b"}\n")
    assert result.json == load_description("metrics")
    assert_common_headers(result)


def test_openapi_description_is_valid() -> None:
    doc = load_description("metrics")
    validate(doc)
    assert doc["openapi"] == "3.0.1"
    assert set(doc["paths"]) == {"/", "/api-description", "/metrics"}
    assert set(doc["paths"]["/"]) == {"options"}
    params = doc["paths"]["/metrics"]["get"]["parameters"]
    assert [(p["name"], p["in"], p["schema"]["type"]) for p in params] == [
        ("name[]", "query", "array")
    ]
    assert CONTENT_TYPE in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/", 405),
        ("POST", "/", 405),
        ("POST", "/metrics", 405),
        ("PUT", "/metrics", 405),
        ("DELETE", "/metrics", 405),
        ("OPTIONS", "/metrics", 405),
        ("GET", "/metric", 404),
        ("GET", "/metrics/extra", 404),
        ("GET", "/models", 404),
        ("GET", "/ping", 404),
        ("POST", "/predictions/noop", 404),
    ],
)
def test_routing_errors(client: testing.TestClient, method: str, path: str, code: int) -> None:
    result = client.simulate_request(method, path)
    if code == 404:
        assert_error(result, 404, "ResourceNotFoundException", NOT_FOUND)
    else:
        assert_error(result, 405, "MethodNotAllowedException", NOT_ALLOWED)


def test_no_token_needed(client: testing.TestClient) -> None:
    result = client.simulate_get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert result.status_code == 200


def test_own_responses_are_counted(
    client: testing.TestClient, recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    client.simulate_get("/metrics")
    client.simulate_options("/")
    client.simulate_get("/nope")
    recorder.flush(redis_client)
    page = client.simulate_get("/metrics").text
    assert 'Requests2XX{Level="Host",Hostname="myhost",} 2.0\n' in page
    assert 'Requests4XX{Level="Host",Hostname="myhost",} 1.0\n' in page


def test_without_recorder_nothing_is_counted(redis_client: fakeredis.FakeRedis) -> None:
    client = testing.TestClient(create_metrics_app(redis_client))
    client.simulate_get("/metrics")
    assert redis_client.keys("*") == []


def test_redis_outage_is_a_503(recorder: MetricsRecorder) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    broken = fakeredis.FakeRedis(server=server, decode_responses=True)
    client = testing.TestClient(create_metrics_app(broken, recorder))
    result = client.simulate_get("/metrics")
    assert_error(result, 503, "ServiceUnavailableException", REDIS_DOWN)
    server.connected = True
    assert recorder.flush(broken)
    assert (
        'Requests5XX{Level="Host",Hostname="myhost",} 1.0' in client.simulate_get("/metrics").text
    )


class SyncThing:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"ok": True}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise RuntimeError("unexpected")


class AsyncThing:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"ok": True}

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise RuntimeError("unexpected")


@pytest.mark.parametrize(
    ("make_app", "resource"),
    [(new_wsgi_app, SyncThing), (new_app, AsyncThing)],
    ids=["wsgi", "asgi"],
)
def test_count_responses_middleware(
    recorder: MetricsRecorder, make_app: Any, resource: type[Any]
) -> None:
    # The same middleware counts in the metrics port's WSGI app and the ASGI apps.
    app = make_app([CountResponses(recorder)])
    app.add_route("/thing", resource())
    client = testing.TestClient(app)
    assert client.simulate_get("/thing").status_code == 200
    assert client.simulate_post("/thing").status_code == 500
    assert client.simulate_put("/thing").status_code == 405
    assert client.simulate_get("/other").status_code == 404
    counted: dict[str, Any] = {}
    server = fakeredis.FakeServer()
    redis_client = fakeredis.FakeRedis(server=server, decode_responses=True)
    recorder.flush(redis_client)
    for family in ("Requests2XX", "Requests4XX", "Requests5XX"):
        counted[family] = list(redis_client.hgetall(keys.metrics(family)).values())
    assert counted == {"Requests2XX": ["1"], "Requests4XX": ["2"], "Requests5XX": ["1"]}
