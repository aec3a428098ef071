"""Bad messages never stop a worker: frames and Celery messages that do not parse.

Request/Reply frames are fuzzed (random bytes, and valid headers with every field
given every wrong type) and may raise FrameError only; the online loop answers what it
can, drops the rest and goes on; task messages that do not validate are answered 400.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import struct
import threading
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from celery import Celery

from control.core import keys
from control.core.envelope import FrameError, Part, Reply, Request, pack, reply_address
from control.jobs.store import BATCH_TASK
from workers.handling.types import HandlerFailure, InferenceReply, InferenceRequest, Parameter
from workers.worker import broker
from workers.worker.messages import (
    MessageError,
    parse_request,
    reply_message,
    to_inference_request,
    to_reply,
)
from workers.worker.serving import LOOP_FAILED, ModelRunner, OnlineLoop, answer_all
from workers.worker.tasks import PREDICT_TASK, chunk_problem, predict, register_tasks

INFLIGHT = "mqs:o:inflight:9000"
GOOD = Request(
    id="r1", model="m", version="1.0", deadline=0.0, enqueued=1.0,
    headers={"a": "b"}, parts=(Part("body", "text/plain", b"hello"),),
)  # fmt: skip
#: Values of every JSON type, wrong for most fields.
WRONG: list[Any] = [None, True, 0, -1, 1.5, 1e308, 10**400, "", "x", [], [1, 2, 3], {}, {"a": 1}]


def header_of(request: Request) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(request.frame()[4 : 4 + _size(request.frame())])
    return header


def _size(frame: bytes) -> int:
    return int(struct.unpack(">I", frame[:4])[0])


# -- frames --------------------------------------------------------------------------


def test_a_good_frame_round_trips() -> None:
    assert Request.parse(GOOD.frame()) == GOOD
    reply = Reply(status=200, body=b"ok", headers={"x": "y"}, content_type="text/plain")
    assert Reply.parse(reply.frame()) == reply


def test_random_bytes_raise_only_frame_errors() -> None:
    rng = random.Random(9)
    for _ in range(3000):
        blob = rng.randbytes(rng.randint(0, 64))
        if rng.random() < 0.5:  # a plausible length prefix, so the JSON parser runs too
            blob = struct.pack(">I", max(len(blob) - 4, 0)) + blob[4:]
        for parse in (Request.parse, Reply.parse):
            with contextlib.suppress(FrameError):
                parse(blob)


def _finite(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


#: Which values each field accepts; every other value must be a FrameError.
ACCEPTS: dict[str, Any] = {
    "id": lambda v: isinstance(v, str) and v != "",
    "model": lambda v: isinstance(v, str),
    "version": lambda v: isinstance(v, str),
    "deadline": _finite,
    "enqueued": _finite,
    "headers": lambda v: v == {},
    "kind": lambda v: v in ("predict", "describe"),
    "parts": lambda v: False,  # the payload is 5 bytes: only the real parts describe it
    "parts[0]": lambda v: False,
    "parts[0][0]": lambda v: isinstance(v, str),
    "parts[0][1]": lambda v: isinstance(v, str),
    "parts[0][2]": lambda v: False,  # only 5 fits
}


@pytest.mark.parametrize("field", list(ACCEPTS))
def test_every_request_field_with_every_wrong_type_is_a_frame_error(field: str) -> None:
    assert set(header_of(GOOD)) <= set(ACCEPTS)
    for value in WRONG:
        header = header_of(GOOD)
        if field == "parts[0]":
            header["parts"][0] = value
        elif field.startswith("parts[0]["):
            header["parts"][0][int(field[-2])] = value
        else:
            header[field] = value
        try:
            Request.parse(pack(header, b"hello"))
        except FrameError:
            assert not ACCEPTS[field](value), (field, value)
        else:
            assert ACCEPTS[field](value), (field, value)


def test_headers_that_are_not_an_object_are_a_frame_error() -> None:
    header = header_of(GOOD) | {"headers": ["not", "a", "dict"]}
    with pytest.raises(FrameError):
        Request.parse(pack(header, b"hello"))


def test_negative_part_sizes_cannot_fake_a_payload() -> None:
    header = header_of(GOOD) | {"parts": [["a", "t", 10], ["b", "t", -5]]}
    with pytest.raises(FrameError):
        Request.parse(pack(header, b"hello"))


REPLY_ACCEPTS: dict[str, Any] = {
    "status": lambda v: False,  # none of WRONG, 99 or 600 is an HTTP status
    "reason": lambda v: isinstance(v, str),
    "headers": lambda v: v == {},
    "content_type": lambda v: v is None or isinstance(v, str),
    "error": lambda v: v is None or isinstance(v, str),
    "dequeued": _finite,
}


@pytest.mark.parametrize("field", list(REPLY_ACCEPTS))
def test_every_reply_field_with_every_wrong_type_is_a_frame_error(field: str) -> None:
    base = {"status": 200, "reason": "", "headers": {}, "content_type": None, "error": None}
    for value in [*WRONG, 99, 600]:
        try:
            Reply.parse(pack(base | {field: value}, b""))
        except FrameError:
            assert not REPLY_ACCEPTS[field](value), (field, value)
        else:
            assert REPLY_ACCEPTS[field](value), (field, value)


def test_a_readable_id_survives_a_broken_frame() -> None:
    assert reply_address(pack(header_of(GOOD) | {"headers": 5})) == ("r1", keys.reply("r1"))
    listener = keys.replies("p1")
    broken = header_of(GOOD) | {"headers": 5, "reply_to": listener}
    assert reply_address(pack(broken)) == ("r1", listener)
    # A reply_to that is no reply list never directs a write elsewhere.
    assert reply_address(pack(broken | {"reply_to": "mqs:d:models"})) == ("r1", keys.reply("r1"))
    assert reply_address(pack({"id": 7})) is None
    assert reply_address(b"\x00\x00") is None


# -- the online loop ---------------------------------------------------------------------


class Echo:
    def __init__(self) -> None:
        self.batches: list[list[InferenceRequest]] = []

    def handle(self, batch: list[InferenceRequest], stream: object = None) -> list[InferenceReply]:
        self.batches.append(batch)
        return [
            InferenceReply(200, "", {}, None, b"".join(p.value for p in r.parameters))
            for r in batch
        ]


class Broken:
    def handle(self, batch: list[InferenceRequest], stream: object = None) -> list[InferenceReply]:
        raise RuntimeError("a bug outside the handler")


class ListBatcher:
    """Hands out prepared batches (moving them into the in-flight list like BLMOVE)."""

    window = 0.0
    size = 8

    def __init__(self, client: fakeredis.FakeRedis, batches: list[Any]) -> None:
        self._r = client
        self._batches = batches
        self.calls = 0
        self.drained = threading.Event()

    def prefetch(self, pipe: Any) -> None:
        pipe.lmove("no-queue", INFLIGHT, "RIGHT", "LEFT")  # nothing queued: takes nothing

    def next_batch(self, wait: float, taken: Any = ()) -> list[bytes]:
        assert not taken  # the lists' batches are all it hands out
        self.calls += 1
        if not self._batches:
            self.drained.set()
            threading.Event().wait(0.01)
            return []
        batch = self._batches.pop(0)
        if isinstance(batch, BaseException):
            raise batch
        for frame in batch:
            self._r.lpush(INFLIGHT, frame)
        return list(batch)


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def reply_of(client: fakeredis.FakeRedis, rid: str) -> Reply:
    frames = client.lrange(keys.reply(rid), 0, -1)
    assert len(frames) == 1, frames
    assert isinstance(frames[0], bytes)
    return Reply.parse(frames[0])


def test_malformed_frames_are_answered_when_possible_and_dropped(
    client: fakeredis.FakeRedis,
) -> None:
    bad_headers = pack(header_of(GOOD) | {"id": "bad-1", "headers": "x"}, b"hello")
    bad_parts = pack(header_of(GOOD) | {"id": "bad-2", "parts": [["body", 1]]}, b"hello")
    unreadable = b"\x00\x00\x00\x02{]"
    good = GOOD.frame()
    echo = Echo()
    batcher = ListBatcher(client, [[bad_headers, unreadable, good, bad_parts]])
    loop = OnlineLoop(client, ModelRunner(echo), batcher, INFLIGHT)
    loop.serve(batcher.next_batch(0.1))
    for rid in ("bad-1", "bad-2"):
        answer = reply_of(client, rid)
        assert answer.status == 400 and answer.error is not None
        assert answer.error.startswith("Malformed request frame")
    assert reply_of(client, "r1").body == b"hello"
    assert [len(b) for b in echo.batches] == [1]  # the good one ran, alone
    assert client.llen(INFLIGHT) == 0 and loop.malformed == 3


def test_the_loop_goes_on_after_redis_errors_and_bugs(client: fakeredis.FakeRedis) -> None:
    import redis

    frame = GOOD.frame()
    other = dataclasses.replace(GOOD, id="r2").frame()
    batches: list[Any] = [redis.ConnectionError("gone"), [frame], [other]]
    batcher = ListBatcher(client, batches)
    calls = {"n": 0}

    class FlakyRunner:
        def handle(
            self, batch: list[InferenceRequest], stream: object = None
        ) -> list[InferenceReply]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("bug")
            return Echo().handle(batch)

    loop = OnlineLoop(client, ModelRunner(FlakyRunner()), batcher, INFLIGHT)
    loop.start()
    try:
        assert batcher.drained.wait(10)
    finally:
        loop.stop(5)
    assert reply_of(client, "r1").error == LOOP_FAILED  # the bug: answered 500
    assert reply_of(client, "r1").status == 500
    assert reply_of(client, "r2").status == 200  # and the next request served
    assert client.llen(INFLIGHT) == 0 and loop.failure() == ""


def test_a_dead_loop_reports_its_failure(client: fakeredis.FakeRedis) -> None:
    class Fatal(BaseException):
        pass

    batcher = ListBatcher(client, [Fatal()])
    loop = OnlineLoop(client, ModelRunner(Echo()), batcher, INFLIGHT)
    assert loop.failure() == ""  # not started: nothing to report
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threading, "excepthook", lambda args: None)
        loop.start()
        loop._thread.join(5)
    assert loop.failure() == "Online request loop died"


def test_a_failure_outside_the_handler_answers_500(client: fakeredis.FakeRedis) -> None:
    batcher = ListBatcher(client, [[GOOD.frame()]])
    loop = OnlineLoop(client, ModelRunner(Broken()), batcher, INFLIGHT)
    loop.serve(batcher.next_batch(0.1))
    assert reply_of(client, "r1").status == 500 and client.llen(INFLIGHT) == 0


def test_answer_all_never_raises_for_bad_frames(client: fakeredis.FakeRedis) -> None:
    broken = pack(header_of(GOOD) | {"id": "bad-1", "deadline": "soon"}, b"hello")
    client.lpush(INFLIGHT, GOOD.frame(), broken, b"garbage", b"")
    assert answer_all(client, INFLIGHT, 500, "Worker died.") == 4
    assert reply_of(client, "r1").error == "Worker died."
    assert reply_of(client, "bad-1").error == "Worker died."
    assert not client.exists(INFLIGHT)


# -- Celery messages -----------------------------------------------------------------------


BAD_MESSAGES: list[Any] = [
    None, "text", 5, [], {}, {"id": None}, {"id": True}, {"id": "x", "headers": []},
    {"id": "x", "headers": {"a": 1}}, {"id": "x", "params": {}}, {"id": "x", "params": [5]},
    {"id": "x", "params": [{"name": 1, "text": "a"}]},
    {"id": "x", "params": [{"name": "body", "b64": "!!not base64!!"}]},
    {"id": "x", "params": [{"name": "body", "b64": 5}]},
    {"id": "x", "params": [{"name": "body"}]},
    {"id": "x", "params": [{"name": "body", "text": 5}]},
    {"id": "x", "params": [{"name": "body", "text": "\ud800"}]},
]  # fmt: skip


@pytest.mark.parametrize("message", BAD_MESSAGES)
def test_a_bad_predict_message_is_answered_400(message: Any) -> None:
    with pytest.raises(MessageError):
        parse_request(message)
    echo = Echo()
    answer = predict(echo, message)
    assert answer["status"] == 400 and answer["error"].startswith("Invalid request message")
    assert echo.batches == []


def test_a_good_predict_message_is_read_as_documented() -> None:
    # The shape workers.worker.messages documents: text or base64 values, lowercased headers.
    message = {
        "id": "r", "headers": {"X-Trace": "t"},
        "params": [
            {"name": "body", "content_type": "application/json", "text": "[1, 2]"},
            {"name": "image", "content_type": "image/png", "b64": "iVBORw0KGgo="},
            {"name": "note", "text": "caf\u00e9"},
        ],
    }  # fmt: skip
    assert parse_request(message) == InferenceRequest(
        "r",
        {"x-trace": "t"},
        [
            Parameter("body", "application/json", b"[1, 2]"),
            Parameter("image", "image/png", b"\x89PNG\r\n\x1a\n"),
            Parameter("note", "", "caf\u00e9".encode()),
        ],
    )
    assert parse_request({"id": 7}) == InferenceRequest("7", {}, [])


def test_the_handler_types_convert_to_and_from_each_wire_format() -> None:
    describe = dataclasses.replace(GOOD, kind="describe")
    assert to_inference_request(describe) == InferenceRequest(
        "r1", {"a": "b", "describe": "True"}, list(GOOD.parts)
    )
    assert to_inference_request(GOOD).headers == {"a": "b"}
    reply = InferenceReply(201, "Made", {"x": "y"}, "text/plain", b"\xff")
    framed = to_reply(reply, 5.0)
    assert framed == Reply(201, b"\xff", "Made", {"x": "y"}, "text/plain", None, 5.0)
    assert Reply.parse(framed.frame()) == framed
    assert reply_message(reply) == {
        "status": 201, "reason": "Made", "headers": {"x": "y"},
        "content_type": "text/plain", "b64": "/w==",
    }  # fmt: skip
    assert reply_message(dataclasses.replace(reply, body=b"ok"))["text"] == "ok"


@pytest.fixture
def tasks(client: fakeredis.FakeRedis) -> Iterator[dict[str, Any]]:
    app = Celery("t", set_as_current=False)
    app.conf.task_always_eager = True
    register_tasks(app, Echo(), client, "9000")
    yield app.tasks


def test_tasks_with_wrong_arguments_answer_400(tasks: dict[str, Any]) -> None:
    predict_task, batch_task = tasks[PREDICT_TASK], tasks[BATCH_TASK]
    assert predict_task()["status"] == 400
    assert predict_task({"id": "x"}, "extra")["status"] == 400
    assert predict_task(message={"id": "x"})["status"] == 200
    for args in [(), ("j",), ("j", "0", "5"), (None, 0, 5), ("j", 5, 1), ("j", 0, 10**9)]:
        assert batch_task(*args)["status"] == 400, args
    assert batch_task("0" * 32, 0, 1) is None  # a well-formed chunk of a missing job


def test_chunk_problem_accepts_real_chunks() -> None:
    assert chunk_problem("ab" * 16, 0, 16) == ""
    assert chunk_problem("ab" * 16, True, 16) != ""


def test_handler_failure_is_still_the_handlers_status() -> None:
    class Failing:
        def handle(
            self, batch: list[InferenceRequest], stream: object = None
        ) -> list[InferenceReply]:
            raise HandlerFailure(503, "busy")

    assert predict(Failing(), {"id": "x"}) == {"status": 503, "error": "busy"}


# -- the broker transport ------------------------------------------------------------------


def envelope(**over: Any) -> dict[str, Any]:
    info = {"exchange": "", "routing_key": "q"}
    props = {"body_encoding": "base64", "delivery_tag": "t", "delivery_info": info}
    return {"body": "e30=", "content-type": "application/json", "properties": props} | over


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (envelope(), ""),
        ([1], "not a JSON object"),
        ({"a": 1}, "no properties"),
        (envelope(properties={"delivery_tag": 1}), "no delivery tag"),
        (envelope(properties={"delivery_tag": "t"}), "no delivery info"),
        (envelope(headers=[]), "headers are not an object"),
        (envelope(body=5), "body is not a string"),
        (envelope(body="!!!"), "body is not base64"),
    ],
)
def test_envelope_problem(payload: Any, problem: str) -> None:
    assert broker.envelope_problem(payload) == problem


@pytest.mark.parametrize(
    ("url", "rewritten"),
    [
        ("redis://127.0.0.1:6379/0", "mqserve-redis://127.0.0.1:6379/0"),
        ("redis+socket:///run/r.sock", "mqserve-redis+socket:///run/r.sock"),
        ("amqp://x", "amqp://x"),
    ],
)
def test_guard_switches_the_transport(url: str, rewritten: str) -> None:
    from kombu.connection import Connection

    app = Celery("t", broker=url, set_as_current=False)
    broker.guard(app)
    assert app.conf.broker_url == rewritten
    if rewritten != url:
        connection = Connection(rewritten)  # type: ignore[no-untyped-call]
        assert connection.transport_cls == broker.SCHEME
        assert connection.transport.__class__ is broker.Transport


def test_a_stuck_loop_reports_its_failure(client: fakeredis.FakeRedis) -> None:
    release = threading.Event()

    class Stuck(ListBatcher):
        def next_batch(self, wait: float, taken: Any = ()) -> list[bytes]:
            self.drained.set()
            release.wait(10)  # e.g. a Redis call that never returns
            return []

    batcher = Stuck(client, [])
    loop = OnlineLoop(client, ModelRunner(Echo()), batcher, INFLIGHT)
    loop.start()
    try:
        assert batcher.drained.wait(5)
        assert loop.failure() == ""
        loop._progress -= 1000  # as if the call had hung for 1000 s
        assert loop.failure().startswith("Online request loop made no progress")
    finally:
        release.set()
        loop.stop(5)
    assert loop.failure() == ""  # a stopped loop has not failed
