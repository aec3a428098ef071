"""The batch-job REST resources (``control.jobs.api``) through Falcon's TestClient."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import fakeredis
import falcon
import falcon.testing
import orjson
import pytest
from falcon import testing

from control.http.common import new_app, read_body
from control.jobs.api import add_job_routes
from control.jobs.store import JobStore
from tests.unit.test_jobs import FakeCelery, FakeModel, drain, make_store

LIMIT = 4096


@pytest.fixture
def celery() -> FakeCelery:
    return FakeCelery()


@pytest.fixture
def store(redis_client: fakeredis.FakeRedis, celery: FakeCelery) -> JobStore:
    return make_store(redis_client, celery)


@pytest.fixture
def api(store: JobStore) -> testing.TestClient:
    app = new_app([])
    add_job_routes(app, store, LIMIT)
    return testing.TestClient(app)


def post(
    api: testing.TestClient, path: str, body: bytes, content_type: str = "application/json"
) -> testing.Result:
    return api.simulate_post(path, body=body, headers={"Content-Type": content_type})


def error(result: testing.Result) -> tuple[int, str, str]:
    return result.status_code, result.json["type"], result.json["message"]


def test_submit_a_json_array_then_read_status_and_results(
    api: testing.TestClient, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    result = post(api, "/jobs/echo", orjson.dumps([{"x": i} for i in range(5)]))
    assert result.status_code == 202, result.text
    job = result.json["jobId"]
    assert result.json == {"jobId": job, "status": "queued", "total": 5}
    assert result.headers["Location"] == f"/jobs/{job}"
    assert result.text.startswith('{\n  "jobId"')  # TorchServe's pretty JSON

    drain(redis_client, celery, FakeModel())
    status = api.simulate_get(f"/jobs/{job}").json
    assert (status["status"], status["done"], status["failed"]) == ("succeeded", 5, 0)
    page = api.simulate_get(f"/jobs/{job}/results", params={"offset": "1", "limit": "2"}).json
    assert page == {
        "results": [
            {"index": 1, "status": 200, "result": {"x": 1}},
            {"index": 2, "status": 200, "result": {"x": 2}},
        ],
        "nextOffset": 3,
    }
    last = api.simulate_get(f"/jobs/{job}/results", params={"offset": "3"}).json
    assert [r["index"] for r in last["results"]] == [3, 4] and "nextOffset" not in last


@pytest.mark.parametrize(
    "content_type",
    ["application/jsonl", "application/x-ndjson", "text/plain; charset=utf-8", "APPLICATION/JSONL"],
)
def test_submit_json_lines(
    api: testing.TestClient, store: JobStore, redis_client: fakeredis.FakeRedis, content_type: str
) -> None:
    body = b'{"x": 0}\n\n  [1, 2]  \r\n"three"\n'
    result = post(api, "/jobs/echo/2.0", body, content_type)
    assert result.status_code == 202, result.text
    job = result.json["jobId"]
    assert store.status(job).version == "2.0"
    items = redis_client.hgetall(f"mqs:job:{job}:items")
    assert items == {"0": '{"x": 0}', "1": "[1, 2]", "2": '"three"'}


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"x": 1}\n{"x": \n', "application/jsonl", "Invalid JSON on line 2: "),
        (b"[1, 2", "application/json", "Invalid JSON request body: "),
        (b'{"x": 1}', "application/json", "Invalid JSON request body: expected an array"),
        (b"", "application/json", "Invalid JSON request body"),
        (b"[]", "application/json", "A batch job needs at least one input"),
        (b"\n \n", "application/jsonl", "A batch job needs at least one input"),
        (b"[1]", "application/octet-stream", "Unsupported Content-Type application/octet-stream"),
        (b"[1]", "", "Unsupported Content-Type (none)"),
    ],
)
def test_bad_bodies_are_400s(
    api: testing.TestClient, celery: FakeCelery, body: bytes, content_type: str, message: str
) -> None:
    result = post(api, "/jobs/echo", body, content_type)
    code, kind, text = error(result)
    assert (code, kind) == (400, "BadRequestException")
    assert text.startswith(message), text
    assert celery.sent == []


def test_a_body_over_max_request_size_is_a_bare_413(
    api: testing.TestClient, celery: FakeCelery
) -> None:
    body = orjson.dumps(list(range(LIMIT)))
    assert len(body) > LIMIT
    result = post(api, "/jobs/echo", body)
    assert (result.status_code, result.content) == (413, b"")
    assert celery.sent == []


def test_a_body_without_content_length_is_read_bounded() -> None:
    def chunked(body: bytes) -> Any:
        # No Content-Length: the body arrives in pieces, as a chunked one does.
        return falcon.testing.create_asgi_req(
            method="POST", path="/jobs/echo", body=body, headers={"Transfer-Encoding": "chunked"}
        )

    def read(req: Any) -> bytes:
        return asyncio.run(read_body(req, LIMIT))

    assert chunked(b"").content_length is None
    with pytest.raises(falcon.HTTPContentTooLarge):
        read(chunked(b"x" * (LIMIT + 1)))
    assert len(read(chunked(b"x" * LIMIT))) == LIMIT
    # A Content-Length over the limit is refused before anything is read.
    req: Any = SimpleNamespace(content_length=LIMIT + 1, stream=None)
    with pytest.raises(falcon.HTTPContentTooLarge):
        read(req)


def test_unknown_models_and_jobs(api: testing.TestClient) -> None:
    assert error(post(api, "/jobs/nope", b"[1]")) == (
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    )
    assert error(post(api, "/jobs/echo/9.9", b"[1]")) == (
        404,
        "ModelVersionNotFoundException",
        "Model version: 9.9 does not exist for model: echo",
    )
    missing = "0" * 32
    for method, path, type_ in (
        ("GET", f"/jobs/{missing}", "JobNotFoundException"),
        ("DELETE", f"/jobs/{missing}", "JobNotFoundException"),
        ("GET", f"/jobs/{missing}/results", "JobNotFoundException"),
        ("GET", "/jobs/not-a-job", "JobNotFoundException"),
        ("GET", f"/jobs/{missing}/other", "ResourceNotFoundException"),
    ):
        result = api.simulate_request(method, path)
        assert error(result)[:2] == (404, type_), (method, path)


def test_methods_not_allowed(api: testing.TestClient) -> None:
    result = api.simulate_put("/jobs/echo")
    assert error(result)[:2] == (405, "MethodNotAllowedException")


def test_cancel(
    api: testing.TestClient, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = post(api, "/jobs/echo", b"[1, 2, 3]").json["jobId"]
    result = api.simulate_delete(f"/jobs/{job}")
    assert (result.status_code, result.json) == (200, {"status": f"Job {job} cancelled"})
    assert api.simulate_delete(f"/jobs/{job}").status_code == 200  # idempotent
    model = FakeModel()
    drain(redis_client, celery, model)
    assert model.batches == []
    status = api.simulate_get(f"/jobs/{job}").json
    assert (status["status"], status["done"]) == ("cancelled", 0)
    page: dict[str, Any] = api.simulate_get(f"/jobs/{job}/results").json
    assert page == {"results": [{"index": i, "status": None} for i in range(3)]}


def test_cancelling_a_finished_job_is_a_conflict(
    api: testing.TestClient, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = post(api, "/jobs/echo", b"[1]").json["jobId"]
    drain(redis_client, celery, FakeModel())
    assert error(api.simulate_delete(f"/jobs/{job}")) == (
        409,
        "ConflictStatusException",
        f"Job {job} has already succeeded",
    )


@pytest.mark.parametrize(
    ("params", "count", "next_offset"),
    [
        ({}, 100, 100),
        ({"limit": "5000"}, 1000, 1000),
        ({"limit": "-1"}, 100, 100),
        ({"limit": "x", "offset": "y"}, 100, 100),
        ({"offset": "1000"}, 1, None),
        ({"offset": "-3", "limit": "2"}, 2, 2),
    ],
)
def test_results_paging_limits(
    api: testing.TestClient,
    params: dict[str, str],
    count: int,
    next_offset: int | None,
) -> None:
    job = post(api, "/jobs/echo", b"\n".join(b"1" for _ in range(1001)), "application/jsonl")
    page = api.simulate_get(f"/jobs/{job.json['jobId']}/results", params=params).json
    assert len(page["results"]) == count
    assert page.get("nextOffset") == next_offset
