"""``control.inference.api.read_parts``: what the handler receives from a request's fields.

Every value must be the exact bytes the client sent (TorchServe passes form fields as
raw bytes); 0x80-0xFF must never turn into UTF-8 replacement characters.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote_from_bytes

import falcon
import falcon.asgi
import falcon.testing
import pytest

from control.core.envelope import Part
from control.inference import api

ALL_BYTES = bytes(range(256))
LIMIT = 10_000


def request(body: bytes, content_type: str | None = None, query: str = "") -> falcon.asgi.Request:
    headers = {"Content-Type": content_type} if content_type else {}
    return falcon.testing.create_asgi_req(
        method="POST", path="/invocations", query_string=query, body=body, headers=headers
    )


def read_parts(req: falcon.asgi.Request, limit: int, with_query: bool) -> tuple[Part, ...]:
    """``api.read_parts`` run to completion (it awaits the body)."""
    return asyncio.run(api.read_parts(req, limit, with_query))


def multipart(*fields: tuple[bytes, bytes], boundary: bytes = b"XyZ") -> bytes:
    """A body from ``(part headers, value)`` pairs, byte for byte as given."""
    out = b""
    for headers, value in fields:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data; boundary=XyZ"


def test_urlencoded_percent_escapes_become_raw_bytes() -> None:
    body = b"data=" + quote_from_bytes(ALL_BYTES, safe="").encode()
    assert read_parts(request(body, FORM), LIMIT, False) == (Part("data", "", ALL_BYTES),)


def test_urlencoded_unescaped_high_bytes_stay_as_sent() -> None:
    parts = read_parts(request(b"a=\x80\xff\xfe&b=caf\xc3\xa9", FORM), LIMIT, False)
    assert parts == (Part("a", "", b"\x80\xff\xfe"), Part("b", "", "café".encode()))


def test_urlencoded_keeps_form_semantics() -> None:
    body = b"a=1+2&blank=&bare&a=%2B3&%C3%A9t%C3%A9=%00&bad%FF=x"
    parts = read_parts(request(body, FORM + "; charset=utf-8"), LIMIT, False)
    assert parts == (
        Part("a", "", b"+3"),  # repeated: the last value wins, at the first one's place
        Part("blank", "", b""),
        Part("bare", "", b""),
        Part("été", "", b"\x00"),
        Part("bad\ufffd", "", b"x"),  # names are text; invalid UTF-8 is replaced
    )


def test_query_parameters_are_raw_bytes_and_only_forwarded_when_asked() -> None:
    query = "model_name=m&data=" + quote_from_bytes(ALL_BYTES, safe="")
    req = request(b"{}", "application/json", query)
    assert read_parts(req, LIMIT, True) == (
        Part("model_name", "", b"m"),
        Part("data", "", ALL_BYTES),
        Part("body", "application/json", b"{}"),
    )
    assert read_parts(request(b"{}", "application/json", query), LIMIT, False) == (
        Part("body", "application/json", b"{}"),
    )


def test_query_string_from_a_wsgi_server_is_latin1_text() -> None:
    # PEP 3333: raw (unescaped) bytes in the request line arrive as latin-1 text.
    req = request(b"", "application/json", "v=" + b"\xc3\xa9\xff".decode("latin-1"))
    assert read_parts(req, LIMIT, True)[0] == Part("v", "", b"\xc3\xa9\xff")


def test_multipart_fields_are_raw_bytes_with_torchserve_content_types() -> None:
    body = multipart(
        (b'Content-Disposition: form-data; name="plain"', ALL_BYTES),
        (b'Content-Disposition: form-data; name="typed"\r\nContent-Type: text/plain', ALL_BYTES),
        (b'Content-Disposition: form-data; name="json"\r\nContent-Type: application/json', b"1"),
        (
            b'Content-Disposition: form-data; name="file"; filename="x.bin"\r\n'
            b"Content-Type: application/octet-stream",
            ALL_BYTES,
        ),
        (b'Content-Disposition: form-data; name="img"; filename="x.png"', b"\x89PNG"),
        (b'Content-Disposition: form-data; name="\xc3\xa9t\xc3\xa9"', b"\r\n--XyZ"[:-1]),
    )
    assert read_parts(request(body, MULTIPART), LIMIT, False) == (
        # Fields without a filename are Netty attributes: bytes, no content type.
        Part("plain", "", ALL_BYTES),
        Part("typed", "", ALL_BYTES),
        Part("json", "", b"1"),
        # Files keep their content type (RFC 7578's text/plain when they name none).
        Part("file", "application/octet-stream", ALL_BYTES),
        Part("img", "text/plain", b"\x89PNG"),
        Part("été", "", b"\r\n--Xy"),
    )


def test_multipart_name_that_is_not_utf8_is_a_bad_request() -> None:
    body = multipart((b'Content-Disposition: form-data; name="\xff"', b"x"))
    with pytest.raises(falcon.MediaMalformedError):
        read_parts(request(body, MULTIPART), LIMIT, False)


@pytest.mark.parametrize("content_type", [FORM, MULTIPART, "application/octet-stream"])
def test_body_over_the_limit_is_413_whatever_the_type(content_type: str) -> None:
    body = multipart((b'Content-Disposition: form-data; name="a"', b"x" * LIMIT))
    with pytest.raises(falcon.HTTPContentTooLarge):
        read_parts(request(body, content_type), LIMIT, False)


def test_body_at_the_limit_is_read_whole() -> None:
    body = b"a=" + b"x" * (LIMIT - 2)
    assert read_parts(request(body, FORM), LIMIT, False) == (Part("a", "", body[2:]),)
