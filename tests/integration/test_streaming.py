"""Streaming responses over HTTP (issue 12), with real Redis, a real worker process and
the inference app under gunicorn and uvicorn: TorchServe's own streaming test, a client
that goes away mid-stream, and a handler that fails mid-stream.

No timed assertions: conditions are waited for with deadlines.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import api_process, supervisor_process, wait_for

#: TorchServe's streaming test handler (``mode`` hello), one that generates slowly until
#: its client goes away and then says how far it got (``slow``), and one that fails
#: after two pieces (``broken``).
HANDLER = b"""
import time
from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    request = data[0]["body"]
    mode = request["mode"]
    if mode == "hello":
        for _ in range(3):
            send_intermediate_predict_response(
                ["hello"], context.request_ids, "Intermediate Prediction success", 200, context
            )
        return ["hello world "]
    if mode == "broken":
        for token in ("a", "b"):
            send_intermediate_predict_response([token], context.request_ids, "ok", 200, context)
        raise RuntimeError("the model broke mid-stream")
    sent = 0
    try:
        for _ in range(3000):
            send_intermediate_predict_response(
                ["tok%d " % sent], context.request_ids, "ok", 200, context
            )
            sent += 1
            time.sleep(0.02)
        return ["never cancelled"]
    finally:
        with open(request["marker"], "w") as marker:
            marker.write(str(sent))
"""


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[str]:
    build_mar(store / "streamer.mar", "streamer", "1.0", extra={"noop_handler.py": HANDLER})
    with (
        api_process(stack_settings, tmp_path / "api") as management,
        api_process(stack_settings, tmp_path / "api", "inference") as inference,
        supervisor_process(stack_settings, tmp_path / "h1", "h1"),
    ):
        response = ManagementClient(management).register_model_with_params(
            {"url": "streamer.mar", "initial_workers": 1, "synchronous": "true"}
        )
        assert response.status == 200, response.body
        yield inference


def stream(base: str, payload: dict[str, Any]) -> requests.Response:
    return requests.post(f"{base}/predictions/streamer", json=payload, stream=True, timeout=60)


def hello_works(base: str) -> None:
    """TorchServe's test: four chunks, concatenated ``hellohellohellohello world ``."""
    with stream(base, {"mode": "hello"}) as response:
        assert response.status_code == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in response.headers
        assert response.headers["ts_stream_next"] == "true"  # the first piece's header
        chunks = [c for c in response.iter_content(chunk_size=None) if c]
    assert chunks == [b"hello", b"hello", b"hello", b"hello world "]
    assert b"".join(chunks).decode() == "hellohellohellohello world "


def test_three_intermediate_results_stream_four_chunks(stack: str) -> None:
    hello_works(stack)
    hello_works(stack)  # and again: nothing of the first stream is left behind


def test_a_client_that_disconnects_stops_the_handler_and_the_stack_serves_on(
    stack: str, tmp_path: Path
) -> None:
    marker = tmp_path / "stopped"
    parts = urlsplit(stack)
    assert parts.hostname is not None and parts.port is not None
    body = json.dumps({"mode": "slow", "marker": str(marker)}).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(
            b"POST /predictions/streamer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"tok1 " not in received:  # the head and a few pieces are streaming
            data = sock.recv(65536)
            assert data, "the server closed the stream"
            received += data
    assert received.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in received.lower()
    # The handler is stopped at its next piece (it would otherwise run for a minute).
    wait_for(marker.exists, 30, "the handler to stop")
    wait_for(lambda: marker.read_text() != "", 5, "the marker's count")
    assert 2 <= int(marker.read_text()) < 3000
    hello_works(stack)  # the one worker is free again: nothing is stuck


def test_a_handler_error_mid_stream_ends_the_response_after_the_pieces_sent(
    stack: str,
) -> None:
    with stream(stack, {"mode": "broken"}) as response:
        # The head went with the first piece: the status cannot say what came later.
        assert response.status_code == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        chunks = [c for c in response.iter_content(chunk_size=None) if c]
    assert chunks == [b"a", b"b"]
    hello_works(stack)
