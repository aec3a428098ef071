"""The inference app's streamed answers, driven through ASGI directly (no server): a
first piece makes the answer chunked with that piece's head, one body event per piece;
a client disconnect stops the forwarding and closes the dispatcher's stream (which is
what cancels it); an error mid-stream ends the body after the pieces sent.

Falcon's test client cannot be used: its ``receive`` reports a disconnect as soon as the
body has been read, where a server reports it when the client goes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

from control.core.dispatch import Delivery
from control.core.envelope import Reply
from control.core.settings import Settings
from control.inference.api import create_inference_app
from tests.unit.test_dispatch import asynchronous, eventually

_END = Reply(status=599)  # tells the fake stream to stop (never sent to the app)


def piece(text: bytes) -> Reply:
    return Reply(200, text, headers={"ts_stream_next": "true"}, more=True)


def final(text: bytes) -> Reply:
    return Reply(200, text, headers={"ts_stream_next": "false"})


class FakeDispatcher:
    """``Dispatcher.stream`` fed by the test, one reply at a time."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[Reply] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Delivery, None]:
        try:
            while (reply := await self.replies.get()) is not _END:
                yield Delivery(reply, 0.0, "1.0")
        finally:
            self.closed.set()

    async def close(self) -> None:
        pass


class Exchange:
    """One POST /predictions/m through the ASGI app; the client disconnects on demand."""

    def __init__(self, dispatcher: FakeDispatcher) -> None:
        self.app = create_inference_app(Settings(), dispatcher, lambda: True, [])  # type: ignore[arg-type]
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self._events = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive(self) -> dict[str, Any]:
        if self._events:
            return self._events.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def run(self) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "path": "/predictions/m", "raw_path": b"/predictions/m",
            "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 8080),
            "client": ("127.0.0.1", 5000),
            "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                        (b"content-length", b"2")],
        }  # fmt: skip
        await self.app(scope, self.receive, self.send)  # type: ignore[arg-type]

    @property
    def head(self) -> tuple[int, dict[str, str]]:
        start = self.sent[0]
        assert start["type"] == "http.response.start"
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent[1:] if m.get("body")]

    @property
    def ended(self) -> bool:
        """Whether the response was completed (its last body event says no more)."""
        last = self.sent[-1]
        return last["type"] == "http.response.body" and not last.get("more_body", False)


@asynchronous
async def test_pieces_are_chunks_with_the_first_pieces_head() -> None:
    dispatcher = FakeDispatcher()
    exchange = Exchange(dispatcher)
    served = asyncio.create_task(exchange.run())
    for count in range(1, 4):
        dispatcher.replies.put_nowait(piece(b"hello"))
        # Forwarded as it comes: written before the next piece exists.
        await eventually(lambda n=count: len(exchange.bodies) == n, f"chunk {count}")  # type: ignore[misc]
    dispatcher.replies.put_nowait(final(b"hello world "))
    await served
    status, headers = exchange.head
    assert status == 200
    assert headers["ts_stream_next"] == "true"
    assert "content-length" not in headers  # the server then sends it chunked
    assert exchange.bodies == [b"hello"] * 3 + [b"hello world "]
    assert exchange.ended
    assert dispatcher.closed.is_set()


@asynchronous
async def test_a_client_that_goes_away_stops_the_forwarding_and_closes_the_stream() -> None:
    dispatcher = FakeDispatcher()
    exchange = Exchange(dispatcher)
    served = asyncio.create_task(exchange.run())
    dispatcher.replies.put_nowait(piece(b"tok"))
    await eventually(lambda: exchange.bodies == [b"tok"], "the first chunk")
    exchange.gone.set()
    # Closed while waiting for a piece that never comes: the dispatcher then cancels it.
    await asyncio.wait_for(dispatcher.closed.wait(), 5)
    await served
    dispatcher.replies.put_nowait(piece(b"unread"))
    assert exchange.bodies == [b"tok"]


@asynchronous
async def test_an_error_mid_stream_ends_the_body_after_the_pieces_sent() -> None:
    dispatcher = FakeDispatcher()
    exchange = Exchange(dispatcher)
    for reply in (piece(b"a"), piece(b"b"), Reply(503, error="Prediction failed")):
        dispatcher.replies.put_nowait(reply)
    await exchange.run()
    assert exchange.head[0] == 200
    assert exchange.bodies == [b"a", b"b"]
    assert exchange.ended
    assert dispatcher.closed.is_set()


@asynchronous
async def test_an_answer_that_does_not_stream_has_a_length_and_one_body() -> None:
    dispatcher = FakeDispatcher()
    exchange = Exchange(dispatcher)
    dispatcher.replies.put_nowait(final(b"whole"))
    await exchange.run()
    status, headers = exchange.head
    assert (status, headers["content-length"]) == (200, "5")
    assert exchange.bodies == [b"whole"]
    assert dispatcher.closed.is_set()


@asynchronous
async def test_an_error_before_any_piece_is_torchserves_json_error() -> None:
    dispatcher = FakeDispatcher()
    exchange = Exchange(dispatcher)
    dispatcher.replies.put_nowait(Reply(503, error="Prediction failed"))
    await exchange.run()
    assert exchange.head[0] == 503
    assert json.loads(b"".join(exchange.bodies)) == {
        "code": 503, "type": "InternalServerException", "message": "Prediction failed",
    }  # fmt: skip
