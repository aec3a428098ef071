"""Bounds enforced by the real server: gunicorn's request limits answered in TorchServe's
JSON on the management and inference ports, and a 1 GiB zip bomb refused at registration.
Every refusal leaves the registry as it was."""

from __future__ import annotations

import json
import socket
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.core.settings import Settings
from tests.support.archives import build_mar, manifest
from tests.support.processes import api_process

LINE_TOO_LONG = "The request line is longer than 4096 bytes."
HEADERS_TOO_LARGE = (
    "The request headers are too large (at most 100 fields of at most 8192 bytes each)."
)


def exchange(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw ``request`` bytes; return status, headers (lower-case names) and body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode()


def assert_json_error(
    response: tuple[int, dict[str, str], bytes], code: int, type_: str, message: str
) -> None:
    status, headers, body = response
    assert status == code, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert headers["cache-control"] == "no-cache; no-store, must-revalidate, private"
    uuid.UUID(headers["x-request-id"])
    assert int(headers["content-length"]) == len(body)
    assert (
        body
        == (
            f'{{\n  "code": {code},\n  "type": "{type_}",\n  "message": {json.dumps(message)}\n}}\n'
        ).encode()
    )


@pytest.fixture
def seeded_settings(stack_settings: Settings, store: Path) -> Settings:
    build_mar(store / "noop.mar", "noop")
    return stack_settings


def models(base: str) -> bytes:
    status, _, body = exchange(base, get("/models"))
    assert status == 200
    return body


@pytest.fixture
def management(seeded_settings: Settings, tmp_path: Path) -> Iterator[str]:
    with api_process(seeded_settings, tmp_path / "mgmt", "management") as base:
        status, _, _ = exchange(base, b"POST /models?url=noop.mar HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        yield base


@pytest.mark.parametrize(("app", "path"), [("management", "/models"), ("inference", "/ping")])
def test_request_limits_answer_json(
    app: str, path: str, management: str, seeded_settings: Settings, tmp_path: Path
) -> None:
    with api_process(seeded_settings, tmp_path / app, app) as base:
        before = models(management)
        # Within the limits: the application answers (a request line of 4096 bytes, a
        # header field of 8192 bytes, 90 more fields).
        target = f"{path}?" + "p" * (4096 - len(f"GET {path}? HTTP/1.1"))
        assert len(f"GET {target} HTTP/1.1") == 4096
        field = "X-Pad: " + "h" * (8192 - len("X-Pad: "))
        many = "".join(f"X-{i}: v\r\n" for i in range(90))
        status, headers, body = exchange(base, get(target, f"{field}\r\n{many}"))
        assert status == 200, body
        assert headers["content-type"] == "application/json"

        assert_json_error(
            exchange(base, get(target + "p")), 414, "BadRequestException", LINE_TOO_LONG
        )
        assert_json_error(
            exchange(base, get(f"{path}?" + "p" * 100_000)),
            414,
            "BadRequestException",
            LINE_TOO_LONG,
        )
        assert_json_error(
            exchange(base, get(path, f"{field}h\r\n")),
            431,
            "BadRequestException",
            HEADERS_TOO_LARGE,
        )
        lots = "".join(f"X-{i}: v\r\n" for i in range(101))
        assert_json_error(
            exchange(base, get(path, lots)), 431, "BadRequestException", HEADERS_TOO_LARGE
        )
        status, headers, body = exchange(base, b"NOT-HTTP\r\n\r\n")
        assert status == 400
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["type"] == "BadRequestException"
        assert json.loads(body)["message"].startswith("Invalid HTTP request: ")
        assert models(management) == before


def write_zip_bomb(path: Path, size: int) -> None:
    """A .mar with one ``size``-byte member of zeros, written in 1 MiB pieces."""
    chunk = bytes(1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest("bomb")))
        with zf.open("model.pt", "w", force_zip64=True) as out:
            for _ in range(size // len(chunk)):
                out.write(chunk)


def test_zip_bomb_refused_at_registration(management: str, store: Path) -> None:
    write_zip_bomb(store / "bomb.mar", 1024**3)
    assert (store / "bomb.mar").stat().st_size < 2 * 1024**2  # 1 GiB in about 1 MiB
    before = models(management)
    assert_json_error(
        exchange(management, b"POST /models?url=bomb.mar HTTP/1.1\r\nHost: x\r\n\r\n"),
        400,
        "InvalidModelException",
        "Invalid model archive: member compression ratio exceeds the limit (zip bomb)",
    )
    assert models(management) == before
    status, _, _ = exchange(management, get("/models/bomb"))
    assert status == 404
