"""The management API's OpenAPI description: valid, complete, and true to the server."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from falcon import testing
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator

from control.archives.store import ModelStore
from control.core.settings import Settings
from control.http.auth import KeyStore
from control.http.openapi import load_description
from control.management.api import model_description
from control.management.service import ManagementService
from tests.support.archives import build_mar
from tests.support.asgi import management_client
from tests.support.openapi import all_refs, error_types, operations, resolve, without_error_response

TEMPLATE_PARAMS = {"model_name", "model_version", "workflow_name"}
UNROUTED_TYPES = {404: "ResourceNotFoundException", 405: "MethodNotAllowedException"}
#: Values for path parameters and required query parameters in requests.
SAMPLES = {
    "model_name": "noop",
    "model_version": "1.0",
    "workflow_name": "wf",
    "url": "noop.mar",
    "type": "management",
}
#: Operations the test app (token authorization disabled) does not route, as the
#: description says: ``GET /token`` only exists while token authorization is on.
UNROUTED_WITHOUT_AUTH = {("/token", "get"): 404}


@pytest.fixture(scope="module")
def description() -> dict[str, Any]:
    return load_description("management")


def operation_ids() -> list[str]:
    return [f"{m.upper()} {p}" for p, m, _ in operations(load_description("management"))]


# -- the document itself ------------------------------------------------------------------


def test_file_parses_as_openapi_3_0_1() -> None:
    text = resources.files("control.http.openapi").joinpath("management.json").read_text("utf-8")
    doc = json.loads(text)
    assert doc["openapi"] == "3.0.1"
    assert doc["info"]["title"] == "mqserve Management API"
    assert doc["info"]["version"] == "0.1.0"


def test_valid_openapi_3_0(description: dict[str, Any]) -> None:
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


def test_every_operation_documents_an_error_response(description: dict[str, Any]) -> None:
    assert without_error_response(description) == []


def test_only_the_description_routes_skip_token_auth(description: dict[str, Any]) -> None:
    assert description["security"] == [{"bearerAuth": []}]
    open_ops = {(p, m) for p, m, op in operations(description) if op.get("security") == []}
    assert open_ops == {("/", "options"), ("/api-description", "get")}
    schemes = description["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}


def test_documented_parameters(description: dict[str, Any]) -> None:
    paths = description["paths"]

    def params(path: str, method: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in paths[path][method]["parameters"]}

    register = params("/models", "post")
    assert set(register) == {
        "url",
        "model_name",
        "handler",
        "runtime",
        "batch_size",
        "max_batch_delay",
        "initial_workers",
        "synchronous",
        "response_timeout",
        "startup_timeout",
        "s3_sse_kms",
    }
    assert [n for n, p in register.items() if p.get("required")] == ["url"]
    assert register["runtime"]["schema"]["enum"] == ["python", "python3", "LSP"]
    assert register["synchronous"]["schema"]["default"] is True
    body = resolve(
        description,
        paths["/models"]["post"]["requestBody"]["content"]["application/json"]["schema"],
    )
    assert set(body["properties"]) == set(register)
    assert body["required"] == ["url"]
    for path in ("/models/{model_name}", "/models/{model_name}/{model_version}"):
        scale = params(path, "put")
        assert {"min_worker", "max_worker", "synchronous", "timeout", "number_gpu"} <= set(scale)
        assert scale["synchronous"]["schema"]["default"] is False
    assert "model_version" in params("/models/{model_name}", "put")
    assert set(params("/models", "get")) == {"limit", "next_page_token"}
    assert params("/token", "get")["type"]["schema"]["enum"] == ["management", "inference"]


def test_describe_schema_has_every_torchserve_field(description: dict[str, Any]) -> None:
    schemas = description["components"]["schemas"]
    describe = resolve(description, schemas["DescribeModelResponse"])
    assert describe["type"] == "array"
    model = resolve(description, describe["items"])
    assert list(model["required"]) == [
        "modelName",
        "modelVersion",
        "modelUrl",
        "runtime",
        "minWorkers",
        "maxWorkers",
        "batchSize",
        "maxBatchDelay",
        "responseTimeout",
        "startupTimeout",
        "maxRetryTimeoutInSec",
        "clientTimeoutInMills",
        "parallelType",
        "parallelLevel",
        "deviceType",
        "continuousBatching",
        "useJobTicket",
        "useVenv",
        "stateful",
        "sequenceMaxIdleMSec",
        "sequenceTimeoutMSec",
        "maxNumSequence",
        "maxSequenceJobQueueSize",
        "loadedAtStartup",
        "workers",
        "jobQueueStatus",
    ]
    worker = resolve(description, model["properties"]["workers"]["items"])
    assert worker["properties"]["id"]["type"] == "string"
    assert worker["properties"]["gpu"]["type"] == "boolean"
    assert worker["properties"]["status"]["enum"] == ["READY", "UNLOADING"]
    assert set(worker["required"]) == {
        "id",
        "startTime",
        "status",
        "memoryUsage",
        "pid",
        "gpu",
        "gpuUsage",
    }
    error = schemas["ErrorResponse"]
    assert error["required"] == ["code", "type", "message"]
    assert error["properties"]["code"]["type"] == "integer"


def test_model_description_keeps_only_the_models_paths(description: dict[str, Any]) -> None:
    doc = model_description(description, "noop")
    assert set(doc["paths"]) == {
        "/models/noop",
        "/models/noop/all",
        "/models/noop/{model_version}",
        "/models/noop/{model_version}/set-default",
    }
    assert all(p == "/models/noop" or p.startswith("/models/noop/") for p in doc["paths"])
    assert doc["openapi"] == "3.0.1"
    # The shared description is not changed by deriving a per-model one.
    assert "/models/{model_name}" in description["paths"]


# -- the description against the server ----------------------------------------------------


def _store(root: Path) -> Any:
    return ModelStore(root, ())


def _service(tmp_path: Path, client: fakeredis.FakeRedis, **changes: Any) -> ManagementService:
    settings = Settings(
        home=tmp_path / "home",
        model_store=tmp_path,
        enable_model_api=True,
        disable_token_authorization=True,
        redis_url="redis://unused",
        unregister_model_timeout=5,
    ).replace(**changes)
    return ManagementService(settings, client, _store(tmp_path))


def _redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)


def _request(
    app: testing.TestClient,
    doc: dict[str, Any],
    path: str,
    method: str,
    headers: dict[str, str] | None = None,
) -> testing.Result:
    op = doc["paths"][path][method]
    query = {}
    for param in (resolve(doc, p) for p in op.get("parameters", [])):
        if param["in"] == "query" and param.get("required"):
            query[param["name"]] = SAMPLES[param["name"]]
    concrete = re.sub(r"\{([^}]*)\}", lambda m: SAMPLES[m.group(1)], path)
    return app.simulate_request(method.upper(), concrete, params=query, headers=headers)


def _check_documented(doc: dict[str, Any], path: str, method: str, result: testing.Result) -> None:
    """The answer's status is documented; an error's type is one the description names."""
    op = doc["paths"][path][method]
    where = f"{method.upper()} {path} -> {result.status_code} {result.text}"
    assert str(result.status_code) in op["responses"], where
    response = op["responses"][str(result.status_code)]
    if result.status_code >= 400:
        types = error_types(doc, response)
        if types:
            assert result.json["type"] in types, where
    schema = resolve(doc, response).get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        validator = OAS30Validator({**schema, "components": doc["components"]})
        errors = [e.message for e in validator.iter_errors(result.json)]
        assert errors == [], where


@pytest.mark.parametrize("registered", [False, True], ids=["empty", "registered"])
@pytest.mark.parametrize("operation", operation_ids())
def test_every_documented_operation_is_routed(
    operation: str, registered: bool, tmp_path: Path, description: dict[str, Any]
) -> None:
    method, path = operation.split(" ", 1)
    method = method.lower()
    client = _redis()
    app = management_client(_service(tmp_path, client), client)
    if registered:
        build_mar(tmp_path / "noop.mar", "noop", "1.0")
        assert app.simulate_post("/models", params={"url": "noop.mar"}).status_code == 200
    result = _request(app, description, path, method)
    body = result.json if result.status_code >= 400 else {}
    unrouted = (
        result.status_code in UNROUTED_TYPES
        and body.get("type") == UNROUTED_TYPES[result.status_code]
    )
    expected = UNROUTED_WITHOUT_AUTH.get((path, method))
    if expected is not None:
        assert result.status_code == expected and unrouted, result.text
        assert UNROUTED_TYPES[expected] in error_types(
            description, description["paths"][path][method]["responses"][str(expected)]
        )
    else:
        assert not unrouted, f"{operation}: {result.status_code} {result.text}"
    _check_documented(description, path, method, result)


def test_options_root_serves_the_description(tmp_path: Path, description: dict[str, Any]) -> None:
    client = _redis()
    app = management_client(_service(tmp_path, client), client)
    assert app.simulate_options("/").json == description
    assert app.simulate_get("/api-description").json == description


def test_token_auth_as_described(tmp_path: Path, description: dict[str, Any]) -> None:
    """With token authorization on: every operation but the two description ones needs
    the management key, and ``GET /token`` (API key) answers as documented."""
    client = _redis()
    keystore = KeyStore(client, tmp_path / "home" / "key_file.json", 60.0)
    issued = keystore.issue_all()
    service = _service(tmp_path, client, disable_token_authorization=False)
    app = management_client(service, client, keystore)
    for path, method, op in operations(description):
        result = _request(app, description, path, method)
        _check_documented(description, path, method, result)
        if op.get("security") == []:
            assert result.status_code == 200, f"{method.upper()} {path}"
        else:
            assert result.status_code == 400, f"{method.upper()} {path}"
            assert result.json["type"] == "InvalidKeyException"
    api = {"Authorization": f"Bearer {issued['API']}"}
    rotated = _request(app, description, "/token", "get", headers=api)
    assert rotated.status_code == 200
    _check_documented(description, "/token", "get", rotated)
    management = {"Authorization": f"Bearer {issued['management']}"}
    refused = _request(app, description, "/token", "get", headers=management)
    _check_documented(description, "/token", "get", refused)
    assert refused.status_code == 400
