"""Input bounds: hostile or nonsense parameters and archives get a TorchServe-shaped 4xx
and leave the registry exactly as it was (list and describe compared before and after)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine

from control.archives.store import Limits, ModelStore
from control.archives.unpack import invalid
from control.core.errors import DownloadArchiveException, InvalidModelException
from control.core.settings import Settings, SettingsError, apply_properties
from control.http.gunicorn_worker import LIMIT_ARGS, WORKER_CLASS, error_message, error_response
from control.http.params import Params
from tests.support.archives import build_mar, manifest
from tests.unit.test_management_api import assert_error, registry_snapshot

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def seeded(client: testing.TestClient) -> testing.TestClient:
    """A registry with one model in it, so "unchanged" is not trivially "empty"."""
    assert client.simulate_post("/models", params={"url": "other.mar"}).status_code == 200
    return client


def register_json(client: testing.TestClient, body: dict[str, Any]) -> testing.Result:
    return client.simulate_post("/models", body=json.dumps(body), headers=JSON)


# -- worker counts -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [3e9, 3000000000, "3000000000", 65, 10**30])
def test_register_json_initial_workers_above_maximum(
    seeded: testing.TestClient, workers: Any
) -> None:
    before = registry_snapshot(seeded)
    assert_error(
        register_json(seeded, {"url": "noop.mar", "initial_workers": workers}),
        400,
        "BadRequestException",
        "initial_workers cannot be more than 64.",
    )
    assert registry_snapshot(seeded) == before


def test_register_query_initial_workers_above_maximum(seeded: testing.TestClient) -> None:
    before = registry_snapshot(seeded)
    digits = "9" * 5000  # longer than Python converts to int at all
    for value in ("65", digits):
        assert_error(
            seeded.simulate_post("/models", params={"url": "noop.mar", "initial_workers": value}),
            400,
            "BadRequestException",
            "initial_workers cannot be more than 64.",
        )
    assert registry_snapshot(seeded) == before


def test_register_at_the_maximum_is_accepted(client: testing.TestClient) -> None:
    result = client.simulate_post(
        "/models", params={"url": "noop.mar", "initial_workers": "64", "synchronous": "false"}
    )
    assert result.status_code == 202
    doc = client.simulate_get("/models/noop").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == (64, 64)


def test_maximum_is_a_setting(make_client: Any, settings: Settings) -> None:
    client = make_client(settings.replace(max_workers_per_model=2))
    assert_error(
        client.simulate_post("/models", params={"url": "noop.mar", "initial_workers": "3"}),
        400,
        "BadRequestException",
        "initial_workers cannot be more than 2.",
    )
    assert client.simulate_get("/models").json == {"models": []}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("minWorkers: 1\nmaxWorkers: 65\n", "maxWorkers"),
        ("minWorkers: 3000000000\nmaxWorkers: 3000000000\n", "minWorkers"),
        ("minWorkers: 100\nmaxWorkers: 200\n", "minWorkers"),
    ],
)
def test_yaml_workers_above_maximum(
    seeded: testing.TestClient, store_dir: Path, config: str, key: str
) -> None:
    build_mar(store_dir / "cfg.mar", "cfg", config_yaml=config)
    before = registry_snapshot(seeded)
    assert_error(
        seeded.simulate_post("/models", params={"url": "cfg.mar"}),
        400,
        "InvalidModelException",
        f"model-config.yaml {key} cannot be more than 64.",
    )
    assert registry_snapshot(seeded) == before


def test_yaml_workers_that_do_not_win_are_not_checked(
    client: testing.TestClient, store_dir: Path
) -> None:
    """maxWorkers < minWorkers: TorchServe ignores the yaml's counts, and so does the bound."""
    build_mar(store_dir / "cfg.mar", "cfg", config_yaml="minWorkers: 500\nmaxWorkers: 1\n")
    result = client.simulate_post("/models", params={"url": "cfg.mar"})
    assert result.status_code == 200
    doc = client.simulate_get("/models/cfg").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == (0, 0)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("min_worker=65", "min_worker cannot be more than 64."),
        ("min_worker=3000000000", "min_worker cannot be more than 64."),
        ("min_worker=1&max_worker=65", "max_worker cannot be more than 64."),
        ("min_worker=1&max_worker=99999999999999999999", "max_worker cannot be more than 64."),
    ],
)
def test_scale_above_maximum(seeded: testing.TestClient, query: str, message: str) -> None:
    before = registry_snapshot(seeded)
    assert_error(
        seeded.simulate_put("/models/other", query_string=query),
        400,
        "BadRequestException",
        message,
    )
    assert registry_snapshot(seeded) == before


def test_scale_to_the_maximum_is_accepted(seeded: testing.TestClient) -> None:
    result = seeded.simulate_put("/models/other", query_string="min_worker=64&max_worker=64")
    assert result.status_code == 202
    doc = seeded.simulate_get("/models/other").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == (64, 64)


# -- timeouts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("response_timeout", "-5", "positive"),
        ("response_timeout", "0", "positive"),
        ("response_timeout", "3000000000", "positive"),
        ("startup_timeout", "-5", "0 or more"),
        ("startup_timeout", "-2", "0 or more"),
        ("startup_timeout", "99999999999", "0 or more"),
    ],
)
def test_bad_timeouts(seeded: testing.TestClient, name: str, value: str, allowed: str) -> None:
    before = registry_snapshot(seeded)
    message = f"{name} must be {allowed} and at most 2147483647, or -1 for the default."
    assert_error(
        seeded.simulate_post("/models", params={"url": "noop.mar", name: value}),
        400,
        "BadRequestException",
        message,
    )
    assert_error(
        register_json(seeded, {"url": "noop.mar", name: int(value)}),
        400,
        "BadRequestException",
        message,
    )
    assert registry_snapshot(seeded) == before


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"response_timeout": "-1", "startup_timeout": "-1"}, (120, 120)),  # TorchServe's -1
        ({"response_timeout": "abc", "startup_timeout": "1.5"}, (120, 120)),  # not numbers
        ({"response_timeout": "7", "startup_timeout": "0"}, (7, 0)),  # 0: fail at once
    ],
)
def test_accepted_timeouts(
    client: testing.TestClient, params: dict[str, str], expected: tuple[int, int]
) -> None:
    assert client.simulate_post("/models", params={"url": "noop.mar", **params}).status_code == 200
    doc = client.simulate_get("/models/noop").json[0]
    assert (doc["responseTimeout"], doc["startupTimeout"]) == expected


def test_yaml_numbers_out_of_java_range_are_ignored(
    client: testing.TestClient, store_dir: Path
) -> None:
    build_mar(store_dir / "cfg.mar", "cfg", config_yaml="responseTimeout: 99999999999\n")
    assert client.simulate_post("/models", params={"url": "cfg.mar"}).status_code == 200
    assert client.simulate_get("/models/cfg").json[0]["responseTimeout"] == 120


# -- names and urls -------------------------------------------------------------------------


def test_url_too_long_for_the_file_system(seeded: testing.TestClient) -> None:
    before = registry_snapshot(seeded)
    url = "x" * 252 + ".mar"  # 256 bytes: one more than a file name can have
    assert_error(
        seeded.simulate_post("/models", params={"url": url}),
        404,
        "ModelNotFoundException",
        f"Model not found at: {url}",
    )
    assert registry_snapshot(seeded) == before


def test_url_longer_than_a_request_line(seeded: testing.TestClient) -> None:
    before = registry_snapshot(seeded)
    assert_error(
        register_json(seeded, {"url": "x" * 4097}),
        400,
        "BadRequestException",
        "Parameter url is longer than 4096 characters.",
    )
    assert registry_snapshot(seeded) == before


def test_long_remote_basename_is_refused_before_download(tmp_path: Path) -> None:
    calls: list[str] = []

    def fetch(url: str, target: Path, limit: int) -> None:
        calls.append(url)

    store = ModelStore(tmp_path, (".*",), fetch=fetch)
    url = "https://example.com/" + "é" * 128 + ".mar"  # 260 bytes in UTF-8
    with pytest.raises(DownloadArchiveException) as info:
        store.resolve(url)
    assert info.value.message == f"Failed to download archive from: {url}"
    assert calls == []
    assert list(tmp_path.iterdir()) == []


def test_model_name_too_long(seeded: testing.TestClient) -> None:
    before = registry_snapshot(seeded)
    result = seeded.simulate_post("/models", params={"url": "noop.mar", "model_name": "m" * 201})
    assert result.status_code == 400
    assert result.json["type"] == "InvalidModelException"
    assert registry_snapshot(seeded) == before


# -- zip bombs --------------------------------------------------------------------------

MIB = 1024 * 1024


def zip_with(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest("bomb")))
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def small_free(root: Path) -> ModelStore:
    """A store whose ratio-exempt size is 64 KiB, so that bombs can stay small here."""
    return ModelStore(root, (), Limits(ratio_free_bytes=64 * 1024))


def test_zip_member_ratio_refused(tmp_path: Path) -> None:
    zip_with(tmp_path / "bomb.mar", {"weights.bin": bytes(MIB), "real.bin": b"x" * 10})
    with pytest.raises(InvalidModelException) as info:
        small_free(tmp_path).resolve("bomb.mar")
    assert (
        info.value.message
        == invalid("member compression ratio exceeds the limit (zip bomb)").message
    )


def test_archive_ratio_refused_for_many_small_members(tmp_path: Path) -> None:
    """Each member is under the exempt size; together they are a bomb."""
    zip_with(tmp_path / "bomb.mar", {f"part{i}.bin": bytes(60 * 1024) for i in range(40)})
    with pytest.raises(InvalidModelException) as info:
        small_free(tmp_path).resolve("bomb.mar")
    assert info.value.message == invalid("compression ratio exceeds the limit (zip bomb)").message


def test_tar_gz_ratio_refused(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as tf:
        for name, data in (("MAR-INF/MANIFEST.json", b"{}"), ("zeros.bin", bytes(MIB))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(InvalidModelException) as info:
        small_free(tmp_path).resolve("bomb.tar.gz")
    assert info.value.message == invalid("compression ratio exceeds the limit (zip bomb)").message


def test_compressible_but_sane_archive_passes(tmp_path: Path) -> None:
    """Below the ratio, and small zero-filled files: what real models contain."""
    text = b"".join(b"token%d\n" % i for i in range(100_000))  # ~ 1 MB, compresses ~5x
    zip_with(tmp_path / "ok.mar", {"vocab.txt": text, "pad.bin": bytes(60 * 1024)})
    assert small_free(tmp_path).resolve("ok.mar").manifest["model"]["modelName"] == "bomb"


def test_zip_bomb_registration_leaves_registry_unchanged(
    seeded: testing.TestClient, store_dir: Path
) -> None:
    # Default limits: 8 MiB exempt, ratio 200. 16 MiB of zeros deflate to ~16 KiB.
    zip_with(store_dir / "bomb.mar", {"zeros.bin": bytes(16 * MIB)})
    before = registry_snapshot(seeded)
    assert_error(
        seeded.simulate_post("/models", params={"url": "bomb.mar"}),
        400,
        "InvalidModelException",
        "Invalid model archive: member compression ratio exceeds the limit (zip bomb)",
    )
    assert registry_snapshot(seeded) == before


# -- parsing and settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "whole", "integer"),
    [
        (3e9, 3_000_000_000, -1),  # integral, but out of Java's int range
        (3.0, 3, 3),
        (2.5, None, -1),
        (float("inf"), None, -1),
        (float("nan"), None, -1),
        (True, None, -1),
        ("007", 7, 7),
        ("+12", 12, 12),
        ("1e3", None, -1),
        ("9" * 5000, 10**64, -1),
        ("-" + "9" * 5000, -(10**64), -1),
        ("0" * 5000 + "5", 5, 5),
    ],
)
def test_params_whole_and_integer(value: Any, whole: int | None, integer: int) -> None:
    params = Params({"n": value})
    assert params.whole("n") == whole
    assert params.integer("n", -1) == integer


def test_max_workers_per_model_from_config_properties() -> None:
    assert Settings().max_workers_per_model == 64
    settings = apply_properties(Settings(), {"max_workers_per_model": "8"})
    assert settings.max_workers_per_model == 8
    with pytest.raises(SettingsError, match="max_workers_per_model must be positive"):
        apply_properties(Settings(), {"max_workers_per_model": "0"})
    with pytest.raises(SettingsError, match="default_workers_per_model cannot be more"):
        apply_properties(
            Settings(), {"default_workers_per_model": "9", "max_workers_per_model": "8"}
        )


# -- gunicorn's refusals in JSON (the real server: tests/integration/test_request_bounds.py)


def test_gunicorn_error_response_is_torchserve_shaped() -> None:
    raw = error_response(431, error_message(LimitRequestHeaders("limit request headers"), 431))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert headers["Pragma"] == "no-cache"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body) == {
        "code": 431,
        "type": "BadRequestException",
        "message": "The request headers are too large (at most 100 fields of at most 8192 "
        "bytes each).",
    }


def test_gunicorn_error_messages() -> None:
    assert error_message(LimitRequestLine(5000, 4096), 414) == (
        "The request line is longer than 4096 bytes."
    )
    assert error_message(ValueError("x" * 500), 400) == "Invalid HTTP request: " + "x" * 200
    assert error_message(RuntimeError("secret path /etc"), 500) == (
        "Error while handling the request."
    )
    assert json.loads(error_response(500, "m").partition(b"\r\n\r\n")[2])["type"] == (
        "InternalServerException"
    )
    assert "--limit-request-line" in LIMIT_ARGS and WORKER_CLASS.endswith("JsonErrorWorker")
