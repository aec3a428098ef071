"""Form, multipart and query fields reach a real worker's handler as the bytes sent.

A handler reports, for every parameter it received, the Python type and the hex of the
bytes; each request carries all 256 byte values in one field.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes, urlsplit

import pytest

from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import api_process, supervisor_process

ALL_BYTES = bytes(range(256))
ESCAPED = quote_from_bytes(ALL_BYTES, safe="")

REPORT_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [
        {
            name: [type(value).__name__, bytes(value).hex()]
            if isinstance(value, (bytes, bytearray))
            else [type(value).__name__, repr(value)]
            for name, value in row.items()
        }
        for row in data
    ]
"""


@pytest.fixture
def inference(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[str]:
    build_mar(store / "report.mar", "report", extra={"noop_handler.py": REPORT_HANDLER.encode()})
    with (
        api_process(stack_settings, tmp_path / "api") as management,
        api_process(stack_settings, tmp_path / "api", "inference") as base,
        supervisor_process(stack_settings, tmp_path / "h1", "h1"),
    ):
        registered = ManagementClient(management).register_model("report", "report.mar")
        assert registered.status == 200, registered.body
        yield base


def post(base: str, path: str, body: bytes, content_type: str) -> dict[str, list[str]]:
    """POST and return the handler's report for the one request."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, data
    report: dict[str, list[str]] = json.loads(data)
    return report


def test_urlencoded_field_carries_every_byte(inference: str) -> None:
    body = f"data={ESCAPED}&raw=".encode() + b"\x80\xff"
    report = post(inference, "/predictions/report", body, "application/x-www-form-urlencoded")
    assert report == {"data": ["bytearray", ALL_BYTES.hex()], "raw": ["bytearray", "80ff"]}


def test_multipart_fields_carry_every_byte(inference: str) -> None:
    fields = [
        b'Content-Disposition: form-data; name="plain"',
        b'Content-Disposition: form-data; name="text"\r\nContent-Type: text/plain',
        b'Content-Disposition: form-data; name="file"; filename="all.bin"\r\n'
        b"Content-Type: application/octet-stream",
        b'Content-Disposition: form-data; name="caf\xc3\xa9"',
    ]
    body = b"".join(b"--b0undary\r\n" + f + b"\r\n\r\n" + ALL_BYTES + b"\r\n" for f in fields)
    body += b"--b0undary--\r\n"
    report = post(inference, "/predictions/report", body, "multipart/form-data; boundary=b0undary")
    expected = ["bytearray", ALL_BYTES.hex()]
    assert report == {"plain": expected, "text": expected, "file": expected, "café": expected}


def test_query_parameter_carries_every_byte(inference: str) -> None:
    report = post(
        inference, f"/invocations?model_name=report&data={ESCAPED}", b"\x00\xff", "application/x"
    )
    assert report == {
        "model_name": ["bytearray", b"report".hex()],
        "data": ["bytearray", ALL_BYTES.hex()],
        "body": ["bytearray", "00ff"],
    }


def test_text_field_that_is_valid_utf8_is_still_bytes(inference: str) -> None:
    # TorchServe hands form fields over undecoded; only a body's text/* type decodes.
    body = b'--b\r\nContent-Disposition: form-data; name="t"\r\nContent-Type: text/plain\r\n\r\n'
    body += "héllo".encode() + b"\r\n--b--\r\n"
    report = post(inference, "/predictions/report", body, "multipart/form-data; boundary=b")
    assert report == {"t": ["bytearray", "héllo".encode().hex()]}
    assert post(inference, "/predictions/report", "héllo".encode(), "text/plain") == {
        "body": ["str", repr("héllo")]
    }
