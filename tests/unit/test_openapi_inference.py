"""The inference API's OpenAPI description: valid, complete, and true to the server."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import fakeredis
import fakeredis.aioredis
import falcon
import openapi_spec_validator
import pytest
from falcon import testing
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator

from control import server as server_wiring
from control.core import keys
from control.core.redis_io import Clients
from control.core.registry import Registry
from control.core.settings import Settings
from control.core.spec import ModelSpec
from control.http.auth import KeyStore
from control.http.openapi import load_description
from control.jobs.store import JobStore
from tests.support.openapi import all_refs, error_types, operations, resolve, without_error_response

TEMPLATE_PARAMS = {"model_name", "model_version", "key", "job_id"}
UNROUTED_TYPES = {404: "ResourceNotFoundException", 405: "MethodNotAllowedException"}
JOB_PATHS = ("/jobs/",)
#: The operations the task asks for, TorchServe's and the batch jobs'.
EXPECTED_OPERATIONS = {
    ("/", "options"),
    ("/api-description", "get"),
    ("/ping", "get"),
    ("/predictions/{model_name}", "post"),
    ("/predictions/{model_name}", "options"),
    ("/predictions/{model_name}/{model_version}", "post"),
    ("/predictions/{model_name}/{model_version}", "options"),
    ("/explanations/{model_name}", "post"),
    ("/explanations/{model_name}/{model_version}", "post"),
    ("/v1/models/{model_name}:predict", "post"),
    ("/v1/models/{model_name}:explain", "post"),
    ("/v2/models/{model_name}/infer", "post"),
    ("/v2/models/{model_name}/explain", "post"),
    ("/invocations", "post"),
    ("/models/{model_name}/invoke", "post"),
    ("/{model_name}/predict", "post"),
    ("/{model_name}/{model_version}/predict", "post"),
    ("/jobs/{key}", "post"),
    ("/jobs/{key}", "get"),
    ("/jobs/{key}", "delete"),
    ("/jobs/{model_name}/{model_version}", "post"),
    ("/jobs/{job_id}/results", "get"),
}
#: Operations that run a model on the request (TorchServe's prediction semantics).
PREDICTION_OPERATIONS = {
    (path, method)
    for path, method in EXPECTED_OPERATIONS
    if method == "post" and not path.startswith("/jobs/")
}
OPEN_OPERATIONS = {("/", "options"), ("/api-description", "get"), ("/ping", "get")}
#: Values for path parameters and required query parameters in requests.
SAMPLES = {"model_name": "noop", "model_version": "1.0"}
JOB_BODY = b'[{"text": "a"}, {"text": "b"}]'


@pytest.fixture(scope="module")
def description() -> dict[str, Any]:
    return load_description("inference")


def operation_ids() -> list[str]:
    return [f"{m.upper()} {p}" for p, m, _ in operations(load_description("inference"))]


def error_messages(doc: dict[str, Any], response: dict[str, Any]) -> set[str]:
    media = resolve(doc, response).get("content", {}).get("application/json", {})
    return {
        resolve(doc, example)["value"].get("message")
        for example in media.get("examples", {}).values()
    } - {None}


# -- the document itself ------------------------------------------------------------------


def test_file_parses_as_openapi_3_0_1() -> None:
    text = resources.files("control.http.openapi").joinpath("inference.json").read_text("utf-8")
    doc = json.loads(text)
    assert doc["openapi"] == "3.0.1"
    assert doc["info"]["title"] == "mqserve Inference API"
    assert doc["info"]["version"] == "0.1.0"


def test_valid_openapi_3_0(description: dict[str, Any]) -> None:
    openapi_spec_validator.validate(description)
    errors = [str(e) for e in OpenAPIV30SpecValidator(description).iter_errors()]
    assert errors == []


def test_every_ref_resolves(description: dict[str, Any]) -> None:
    refs = set(all_refs(description))
    assert refs
    for ref in refs:
        resolve(description, {"$ref": ref})


def test_path_templates_use_only_known_parameters(description: dict[str, Any]) -> None:
    for path in description["paths"]:
        names = set(re.findall(r"\{([^}]*)\}", path))
        assert names <= TEMPLATE_PARAMS, path


def test_no_two_paths_are_the_same_template(description: dict[str, Any]) -> None:
    """OpenAPI: templated paths differing only in parameter names MUST NOT exist (so
    ``/jobs/{key}`` serves both a model name for POST and a job id for GET/DELETE)."""
    shapes = [re.sub(r"\{[^}]*\}", "{}", path) for path in description["paths"]]
    assert len(shapes) == len(set(shapes))


def test_documents_every_route(description: dict[str, Any]) -> None:
    documented = {(p, m) for p, m, _ in operations(description)}
    assert documented == EXPECTED_OPERATIONS


def test_every_operation_documents_an_error_response(description: dict[str, Any]) -> None:
    assert without_error_response(description) == []


def test_only_description_and_ping_skip_token_auth(description: dict[str, Any]) -> None:
    assert description["security"] == [{"bearerAuth": []}]
    open_ops = {(p, m) for p, m, op in operations(description) if op.get("security") == []}
    assert open_ops == OPEN_OPERATIONS
    schemes = description["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    error = description["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["code", "type", "message"]


def test_ping_answers(description: dict[str, Any]) -> None:
    responses = description["paths"]["/ping"]["get"]["responses"]
    health = resolve(description, description["components"]["schemas"]["HealthResponse"])
    assert health["properties"]["status"]["enum"] == ["Healthy", "Unhealthy"]
    assert responses["200"]["content"]["application/json"]["example"] == {"status": "Healthy"}
    unhealthy = responses["500"]["content"]["application/json"]["examples"]["Unhealthy"]
    assert unhealthy["value"] == {"status": "Unhealthy"}


def test_prediction_operations_document_torchserve_errors(description: dict[str, Any]) -> None:
    for path, method in PREDICTION_OPERATIONS:
        op = description["paths"][path][method]
        where = f"{method.upper()} {path}"
        responses = op["responses"]
        assert {"200", "400", "404", "413", "429", "500", "503", "507", "default"} <= set(
            responses
        ), where
        assert "*/*" in resolve(description, responses["200"])["content"], where
        body = resolve(description, op["requestBody"])["content"]
        assert {"multipart/form-data", "application/x-www-form-urlencoded", "*/*"} <= set(body)
        assert "InvalidKeyException" in error_types(description, responses["400"]), where
        assert "ModelNotFoundException" in error_types(description, responses["404"]), where
        if "{model_version}" in path:
            assert "ModelVersionNotFoundException" in error_types(description, responses["404"]), (
                where
            )
        assert "Retry-After" in resolve(description, responses["429"])["headers"], where
        assert "Worker died." in error_messages(description, responses["500"]), where
        assert {
            "Prediction failed",
            "Invalid model predict output",
            "number of batch response mismatched",
            "Unsupported model output data type.",
        } <= error_messages(description, responses["503"]), where
        assert "Out of resources" in error_messages(description, responses["507"]), where
    for prefix in ("predictions", "explanations"):
        op = description["paths"][f"/{prefix}/{{model_name}}/{{model_version}}"]["post"]
        assert "url_path" in op["description"]
    invocations = description["paths"]["/invocations"]["post"]
    (model_name,) = invocations["parameters"]
    assert model_name == {**model_name, "name": "model_name", "in": "query", "required": True}
    assert "Parameter model_name is required." in error_messages(
        description, invocations["responses"]["400"]
    )


def test_job_operations(description: dict[str, Any]) -> None:
    paths, schemas = description["paths"], description["components"]["schemas"]
    for path in ("/jobs/{key}", "/jobs/{model_name}/{model_version}"):
        op = paths[path]["post"]
        body = resolve(description, op["requestBody"])["content"]
        assert {"application/json", "application/jsonl", "application/x-ndjson"} <= set(body)
        assert "Location" in op["responses"]["202"]["headers"]
    submitted = resolve(description, schemas["JobSubmitted"])
    assert submitted["required"] == ["jobId", "status", "total"]
    status = resolve(description, schemas["JobStatus"])
    assert status["properties"]["status"]["enum"] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    params = {p["name"]: p for p in paths["/jobs/{job_id}/results"]["get"]["parameters"]}
    assert set(params) == {"offset", "limit"}
    assert params["limit"]["schema"]["maximum"] == 1000
    page = resolve(description, schemas["JobResultsPage"])
    assert set(page["properties"]) == {"results", "nextOffset"}


# -- the description against the server ----------------------------------------------------


class _Celery:
    """Stand-in for the Celery app a ``JobStore`` sends chunks with."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def send_task(self, name: str, args: Any = None, **options: Any) -> None:
        self.sent.append((name, args))


class _Server:
    """The inference app exactly as ``control.server.build_inference`` wires it (batch
    jobs, size limit, token authorization with ``/ping`` exempt, health), over one fake
    Redis; only the Celery app the job store sends chunks with is a stand-in.

    With ``key_file``, token authorization is on and ``self.keys`` holds the issued keys.
    """

    def __init__(
        self,
        registered: bool = False,
        key_file: Path | None = None,
        **changes: Any,
    ) -> None:
        server = fakeredis.FakeServer()
        self.text = fakeredis.FakeRedis(server=server, decode_responses=True)
        home = key_file.parent if key_file is not None else Path("/nonexistent")
        self.settings = Settings(
            redis_url="redis://unused", disable_token_authorization=key_file is None, home=home
        ).replace(**changes)
        self.keys: dict[str, str] = {}
        if key_file is not None:
            assert self.settings.key_file == key_file
            self.keys = KeyStore(self.text, key_file, 60.0).issue_all()
        self.celery = _Celery()
        clients = Clients(self.text, fakeredis.FakeRedis(server=server))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(server_wiring, "make_celery", lambda settings: self.celery)
            self.app = server_wiring.build_inference(
                self.settings, clients, fakeredis.aioredis.FakeRedis(server=server)
            )
        self.jobs = JobStore(self.text, self.celery)
        self.job_id = "0" * 32  # no such job
        if registered:
            self.register(job_queue_size=self.settings.job_queue_size)
            self.job_id = self.jobs.submit("noop", None, [b"1", b"2"]).job_id
        self.client = testing.TestClient(self.app)

    def register(self, **spec: Any) -> None:
        model = ModelSpec("noop", "1.0", "noop.mar", "noop.mar", False, "noop_handler", **spec)
        assert Registry(self.text).register(model, 0, 0)


def _samples(server: _Server, method: str) -> dict[str, str]:
    return {
        **SAMPLES,
        "job_id": server.job_id,
        "key": "noop" if method == "post" else server.job_id,
    }


def _request(
    server: _Server,
    doc: dict[str, Any],
    path: str,
    method: str,
    headers: dict[str, str] | None = None,
) -> testing.Result:
    op = doc["paths"][path][method]
    samples = _samples(server, method)
    query = {}
    for param in (resolve(doc, p) for p in op.get("parameters", [])):
        if param["in"] == "query" and param.get("required"):
            query[param["name"]] = samples[param["name"]]
    concrete = re.sub(r"\{([^}]*)\}", lambda m: samples[m.group(1)], path)
    body, all_headers = None, dict(headers or {})
    if "requestBody" in op:
        if path.startswith(JOB_PATHS):
            body, all_headers["Content-Type"] = JOB_BODY, "application/json"
        else:
            body, all_headers["Content-Type"] = b'{"x": 1}', "application/json"
    return server.client.simulate_request(
        method.upper(), concrete, params=query, headers=all_headers, body=body
    )


def _check_documented(doc: dict[str, Any], path: str, method: str, result: testing.Result) -> None:
    """The answer's status is documented; an error's type is one the description names."""
    op = doc["paths"][path][method]
    where = f"{method.upper()} {path} -> {result.status_code} {result.text}"
    assert str(result.status_code) in op["responses"], where
    response = op["responses"][str(result.status_code)]
    if result.status_code >= 400:
        types = error_types(doc, response)
        if types and "type" in result.json:  # /ping's 500 may be {"status": "Unhealthy"}
            assert result.json["type"] in types, where
    schema = resolve(doc, response).get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        validator = OAS30Validator({**schema, "components": doc["components"]})
        errors = [e.message for e in validator.iter_errors(result.json)]
        assert errors == [], where


@pytest.mark.parametrize("registered", [False, True], ids=["empty", "registered"])
@pytest.mark.parametrize("operation", operation_ids())
def test_every_documented_operation_is_routed(
    operation: str, registered: bool, description: dict[str, Any]
) -> None:
    method, path = operation.split(" ", 1)
    method = method.lower()
    server = _Server(registered=registered)
    result = _request(server, description, path, method)
    body = result.json if result.status_code >= 400 else {}
    unrouted = (
        result.status_code in UNROUTED_TYPES
        and body.get("type") == UNROUTED_TYPES[result.status_code]
    )
    job_lookup = path.startswith(JOB_PATHS) and method != "post"
    if job_lookup and not registered:
        # No job exists: the documented answer is 404 JobNotFoundException.
        assert (result.status_code, body.get("type")) == (404, "JobNotFoundException"), result.text
    else:
        assert not unrouted, f"{operation}: {result.status_code} {result.text}"
    _check_documented(description, path, method, result)


def test_registered_answers_are_the_documented_ones(description: dict[str, Any]) -> None:
    """With the model registered but no worker: 503 with TorchServe's message, per form."""
    server = _Server(registered=True)
    for path, method in sorted(PREDICTION_OPERATIONS):
        result = _request(server, description, path, method)
        assert result.status_code == 503, f"{path}: {result.text}"
        _check_documented(description, path, method, result)
        messages = error_messages(
            description, description["paths"][path][method]["responses"]["503"]
        )
        assert result.json["message"] in messages, path
    wrong = server.client.simulate_post("/predictions/noop/2.0", body=b"x")
    _check_documented(description, "/predictions/{model_name}/{model_version}", "post", wrong)
    assert wrong.json["type"] == "ModelVersionNotFoundException"


def test_invocations_without_model_name(description: dict[str, Any]) -> None:
    result = _Server().client.simulate_post("/invocations", body=b"x")
    assert result.status_code == 400
    _check_documented(description, "/invocations", "post", result)
    assert result.json["message"] == "Parameter model_name is required."


def test_malformed_multipart(description: dict[str, Any]) -> None:
    result = _Server(registered=True).client.simulate_post(
        "/predictions/noop",
        body=b"--x\r\nbroken",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert result.status_code == 400
    _check_documented(description, "/predictions/{model_name}", "post", result)


@pytest.mark.parametrize("healthy", [True, False])
def test_ping(healthy: bool, description: dict[str, Any]) -> None:
    server = _Server()
    if not healthy:  # a model that should have a worker and has none
        model = ModelSpec("noop", "1.0", "noop.mar", "noop.mar", False, "noop_handler")
        assert Registry(server.text).register(model, 1, 1)
    result = server.client.simulate_get("/ping")
    assert result.status_code == (200 if healthy else 500)
    assert result.json == {"status": "Healthy" if healthy else "Unhealthy"}
    _check_documented(description, "/ping", "get", result)


@pytest.mark.parametrize("status", [503, 429])
def test_full_queue(status: int, description: dict[str, Any]) -> None:
    server = _Server(queue_full_status=status)
    server.register(job_queue_size=1)
    server.text.sadd(keys.workers("noop", "1.0"), "w1")
    server.text.hset(keys.worker("w1"), "state", "READY")
    server.text.lpush(keys.online_queue("noop", "1.0"), "waiting")
    result = server.client.simulate_post("/predictions/noop", body=b"x")
    assert result.status_code == status, result.text
    _check_documented(description, "/predictions/{model_name}", "post", result)
    if status == 429:
        assert result.headers["Retry-After"] == "1"


def test_too_large_answers_413_without_body(description: dict[str, Any]) -> None:
    app = _Server(max_request_size=4).app
    documented = description["paths"]["/predictions/{model_name}"]["post"]["responses"]["413"]
    assert "content" not in resolve(description, documented)
    result = testing.TestClient(app).simulate_post("/predictions/noop", body=b"0123456789")
    assert result.status == falcon.HTTP_413
    assert result.content == b""


def test_options_serve_the_description(description: dict[str, Any]) -> None:
    client = _Server(registered=True).client
    assert client.simulate_options("/").json == description
    assert client.simulate_get("/api-description").json == description
    for path in ("/predictions/noop", "/predictions/noop/1.0"):
        titled = client.simulate_options(path).json
        assert titled["info"]["title"] == "mqserve Inference API: noop"
        assert titled["paths"] == description["paths"]
    assert client.simulate_get("/").status_code == 404


def test_job_lifecycle_as_described(description: dict[str, Any]) -> None:
    server = _Server(registered=True)
    client = server.client
    for body, mime in ((JOB_BODY, "application/json"), (b'{"a": 1}\n\n2\n', "application/jsonl")):
        submitted = client.simulate_post("/jobs/noop/1.0", body=body, content_type=mime)
        assert submitted.status_code == 202, submitted.text
        _check_documented(description, "/jobs/{model_name}/{model_version}", "post", submitted)
        job_id = submitted.json["jobId"]
        assert submitted.headers["Location"] == f"/jobs/{job_id}"
    status = client.simulate_get(f"/jobs/{job_id}")
    _check_documented(description, "/jobs/{key}", "get", status)
    assert status.json["status"] == "queued"
    page = client.simulate_get(f"/jobs/{job_id}/results", params={"limit": "1"})
    _check_documented(description, "/jobs/{job_id}/results", "get", page)
    assert page.json == {"results": [{"index": 0, "status": None}], "nextOffset": 1}
    cancelled = client.simulate_delete(f"/jobs/{job_id}")
    _check_documented(description, "/jobs/{key}", "delete", cancelled)
    assert cancelled.json == {"status": f"Job {job_id} cancelled"}
    refused = client.simulate_post("/jobs/noop", body=b"a,b", content_type="text/csv")
    _check_documented(description, "/jobs/{key}", "post", refused)
    assert refused.status_code == 400
    unknown = client.simulate_get("/jobs/" + "f" * 32)
    _check_documented(description, "/jobs/{key}", "get", unknown)
    assert unknown.status_code == 404


def test_token_auth_as_described(tmp_path: Path, description: dict[str, Any]) -> None:
    """With token authorization on: every operation but OPTIONS /, /api-description and
    /ping needs the inference key, as the description says."""
    server = _Server(key_file=tmp_path / "key_file.json")
    for path, method, op in operations(description):
        result = _request(server, description, path, method)
        _check_documented(description, path, method, result)
        if op.get("security") == []:
            assert result.status_code == 200, f"{method.upper()} {path}"
        else:
            assert result.status_code == 400, f"{method.upper()} {path}"
            assert result.json["type"] == "InvalidKeyException"
    key = {"Authorization": f"Bearer {server.keys['inference']}"}
    allowed = _request(server, description, "/predictions/{model_name}", "post", key)
    assert allowed.status_code == 404
    assert allowed.json["type"] == "ModelNotFoundException"
