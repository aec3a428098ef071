"""The worker side of the data plane: where replies go, what expires, how batches move.

Replies go to the request's reply list (its API process's shared ``reply_to``, else its
own ``keys.reply(id)``) and always name the request; the worker applies the model's
``clientTimeoutInMills`` to frames the API sent without a deadline; the rest of a batch
moves in one call, and the reply pipeline takes the next frame, with no frame ever lost.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import fakeredis
import pytest
import redis

from control.core import keys
from control.core.envelope import Part, Reply, Request, answers, pack
from workers import outage as outage_module
from workers.handling.types import InferenceReply, InferenceRequest
from workers.worker.serving import (
    EXPIRED,
    LOOP_FAILED,
    Batcher,
    ModelRunner,
    OnlineLoop,
    answer_all,
    answer_frames,
)

QUEUE, INFLIGHT = keys.online_queue("m", "1.0"), keys.inflight("9000")
LISTENER = keys.replies("api-1")
NOW = 1000.0


def request(rid: str, **over: Any) -> Request:
    base = Request(
        id=rid, model="m", version="", deadline=0.0, enqueued=NOW, headers={},
        parts=(Part("body", "text/plain", rid.encode()),), reply_to=LISTENER,
    )  # fmt: skip
    return dataclasses.replace(base, **over)


class Echo:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def handle(self, batch: list[InferenceRequest], stream: object = None) -> list[InferenceReply]:
        self.batches.append([r.request_id for r in batch])
        return [
            InferenceReply(200, "", {}, None, b"".join(p.value for p in r.parameters))
            for r in batch
        ]


class Counting(fakeredis.FakeRedis):
    """A fake Redis that counts round trips: single commands and pipelines."""

    round_trips = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe: Any = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def counted(raise_on_error: bool = True) -> Any:
            if pipe.command_stack:  # an empty pipeline sends nothing
                self.round_trips += 1
            return execute(raise_on_error)

        pipe.execute = counted
        return pipe


@pytest.fixture
def client() -> Counting:
    return Counting(server=fakeredis.FakeServer())


def batcher(client: fakeredis.FakeRedis, size: int = 1, delay_ms: int = 0) -> Batcher:
    return Batcher(client, QUEUE, INFLIGHT, size, delay_ms)


def loop(
    client: fakeredis.FakeRedis,
    model: Any = None,
    size: int = 1,
    timeout_ms: int = 0,
    observe: Any = None,
) -> OnlineLoop:
    runner = ModelRunner(model or Echo(), observe=observe)
    return OnlineLoop(
        client, runner, batcher(client, size), INFLIGHT, clock=lambda: NOW,
        client_timeout_ms=timeout_ms,
    )  # fmt: skip


def queue(client: fakeredis.FakeRedis, *frames: bytes) -> None:
    for frame in frames:
        client.lpush(QUEUE, frame)  # as the API pushes: LPUSH, workers take from the right


def raw(value: object) -> bytes:
    assert isinstance(value, bytes)  # the client does not decode: frames are bytes
    return value


def frames_on(client: fakeredis.FakeRedis, key: str) -> list[bytes]:
    """The frames of a list, oldest (rightmost) first."""
    return [raw(frame) for frame in reversed(client.lrange(key, 0, -1))]


def replies_on(client: fakeredis.FakeRedis, key: str) -> list[Reply]:
    return [Reply.parse(frame) for frame in frames_on(client, key)]


def serve_queued(online: OnlineLoop, wait: float = 0.01) -> None:
    online.serve(online._batcher.next_batch(wait))


# -- where replies go ------------------------------------------------------------------


def test_replies_land_on_reply_to_naming_their_request(client: Counting) -> None:
    queue(client, request("r1").frame(), request("r2").frame())
    serve_queued(loop(client, size=2))
    frames = frames_on(client, LISTENER)
    assert [answers(f, rid) for f, rid in zip(frames, ["r1", "r2"], strict=True)] == [True] * 2
    assert [(r.id, r.status, r.body) for r in replies_on(client, LISTENER)] == [
        ("r1", 200, b"r1"),
        ("r2", 200, b"r2"),
    ]
    assert not client.exists(keys.reply("r1"), keys.reply("r2"))
    assert 0 < client.pttl(LISTENER) <= keys.REPLY_TTL_MS  # expires if nobody pops it
    assert client.llen(INFLIGHT) == 0


def test_a_frame_without_reply_to_is_answered_on_its_own_list(client: Counting) -> None:
    queue(client, request("r1", reply_to="").frame())
    serve_queued(loop(client))
    [reply] = replies_on(client, keys.reply("r1"))
    assert (reply.id, reply.status, reply.body) == ("r1", 200, b"r1")
    assert not client.exists(LISTENER)


def test_a_malformed_frame_is_answered_on_its_reply_to(client: Counting) -> None:
    header = {"id": "bad", "reply_to": LISTENER, "model": "m", "parts": "not a list"}
    queue(client, pack(header, b"x"))
    online = loop(client)
    serve_queued(online)
    [reply] = replies_on(client, LISTENER)
    assert (reply.id, reply.status) == ("bad", 400)
    assert reply.error is not None and reply.error.startswith("Malformed request frame")
    assert online.malformed == 1 and client.llen(INFLIGHT) == 0


@pytest.mark.parametrize("foreign", [keys.MODELS, keys.worker("9001"), "elsewhere"])
def test_a_reply_to_that_is_no_reply_list_is_never_written(client: Counting, foreign: str) -> None:
    client.zadd(keys.MODELS, {"m": 0})
    before = client.type(foreign)
    frame = pack({"id": "r1", "model": "m", "version": "", "deadline": 0, "enqueued": NOW,
                  "headers": {}, "kind": "predict", "parts": [], "reply_to": foreign})  # fmt: skip
    queue(client, frame)
    serve_queued(loop(client))
    [reply] = replies_on(client, keys.reply("r1"))  # its own list, as a malformed frame
    assert (reply.id, reply.status) == ("r1", 400)
    assert client.type(foreign) == before and client.zrange(keys.MODELS, 0, -1) == [b"m"]


def test_a_failure_outside_the_handler_is_answered_on_reply_to(client: Counting) -> None:
    class Broken:
        def handle(
            self, batch: list[InferenceRequest], stream: object = None
        ) -> list[InferenceReply]:
            raise RuntimeError("a bug")

    queue(client, request("r1").frame())
    serve_queued(loop(client, Broken()))
    [reply] = replies_on(client, LISTENER)
    assert (reply.id, reply.status, reply.error) == ("r1", 500, LOOP_FAILED)


def test_an_abandoned_batch_is_answered_on_reply_to_once(client: Counting) -> None:
    frames = [request("r1").frame(), request("r2", reply_to="").frame()]
    client.lpush(INFLIGHT, *frames)
    assert answer_frames(client, INFLIGHT, frames, 500, LOOP_FAILED) == 2
    assert answer_frames(client, INFLIGHT, frames, 500, LOOP_FAILED) == 0  # gone: not twice
    assert [(r.id, r.status) for r in replies_on(client, LISTENER)] == [("r1", 500)]
    assert [(r.id, r.status) for r in replies_on(client, keys.reply("r2"))] == [("r2", 500)]
    assert client.llen(INFLIGHT) == 0


def test_a_dead_workers_requests_are_answered_on_their_reply_to(client: Counting) -> None:
    other = keys.replies("api-2")
    broken = pack({"id": "bad", "reply_to": other, "deadline": "soon"}, b"")
    client.lpush(INFLIGHT, request("r1").frame(), request("r2", reply_to="").frame(), broken)
    assert answer_all(client, INFLIGHT, 500, "Worker died.") == 3
    assert [(r.id, r.error) for r in replies_on(client, LISTENER)] == [("r1", "Worker died.")]
    assert [r.id for r in replies_on(client, keys.reply("r2"))] == ["r2"]
    assert [r.id for r in replies_on(client, other)] == ["bad"]
    assert not client.exists(INFLIGHT)
    assert all(0 < client.pttl(k) <= keys.REPLY_TTL_MS for k in (LISTENER, other))


# -- clientTimeoutInMills ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("enqueued", "deadline", "timeout_ms", "status"),
    [
        (NOW - 2.0, 0.0, 1000, 408),  # no deadline in the frame: the model's limit applies
        (NOW - 0.5, 0.0, 1000, 200),
        (NOW - 3600, 0.0, 0, 200),  # 0: no limit, TorchServe's default
        (NOW - 2.0, NOW + 5, 1000, 200),  # the frame's own deadline takes precedence
        (NOW - 0.5, NOW - 0.1, 1000, 408),
    ],
)
def test_the_worker_applies_client_timeout_when_the_frame_has_no_deadline(
    client: Counting, enqueued: float, deadline: float, timeout_ms: int, status: int
) -> None:
    echo = Echo()
    queue(client, request("r1", enqueued=enqueued, deadline=deadline).frame())
    serve_queued(loop(client, echo, timeout_ms=timeout_ms))
    [reply] = replies_on(client, LISTENER)
    assert (reply.id, reply.status) == ("r1", status)
    assert reply.error == (EXPIRED if status == 408 else None)
    assert echo.batches == ([] if status == 408 else [["r1"]])  # an expired one is not run
    assert client.llen(INFLIGHT) == 0


# -- taking batches ----------------------------------------------------------------------


def test_the_queued_rest_of_a_batch_moves_in_one_call(client: Counting) -> None:
    frames = [request(f"r{i}").frame() for i in range(10)]
    queue(client, *frames)
    client.round_trips = 0
    take = batcher(client, size=8)
    assert take.take_queued(0) == [] and client.round_trips == 0  # nothing asked: no call
    batch = take.next_batch(0.1)
    assert batch == frames[:8]  # oldest first
    # The first frame (BLMOVE), then the other 7 in one call (plus loading the script,
    # once per Redis: EVALSHA, NOSCRIPT, SCRIPT LOAD, EVALSHA).
    assert client.round_trips == 1 + 3
    client.round_trips = 0
    assert take.next_batch(0.1, taken=[]) == frames[8:]  # queue drained: the window ends
    assert client.llen(QUEUE) == 0
    assert list(reversed(client.lrange(INFLIGHT, 0, -1))) == frames  # moved, not popped


def test_take_queued_moves_at_most_what_it_is_asked_for(client: Counting) -> None:
    frames = [request(f"r{i}").frame() for i in range(5)]
    queue(client, *frames)
    take = batcher(client, size=8)
    assert take.take_queued(3) == frames[:3]
    assert client.llen(QUEUE) == 2 and client.llen(INFLIGHT) == 3
    assert take.take_queued(8) == frames[3:]
    assert take.take_queued(8) == []


def test_frames_are_never_lost_while_batches_are_taken(client: Counting) -> None:
    """Queue + in-flight + answered adds up to what was pushed, at every step."""
    rng = random.Random(11)
    online = loop(client, size=4)
    pushed = answered = 0
    for step in range(60):
        for _ in range(rng.randint(0, 6)):
            queue(client, request(f"r{pushed}").frame())
            pushed += 1
        held = online._serve(online._batcher.next_batch(0.002), take_next=rng.random() < 0.5)
        answered = len(client.lrange(LISTENER, 0, -1))
        in_flight = client.llen(INFLIGHT)
        assert in_flight == len(held), step  # only what the loop holds, nothing stray
        assert client.llen(QUEUE) + in_flight + answered == pushed, step
        if held:
            online._serve(online._batcher.next_batch(0.002, held), take_next=False)
    while client.llen(QUEUE):
        online.serve(online._batcher.next_batch(0.002))
    ids = sorted(r.id for r in replies_on(client, LISTENER))
    assert ids == sorted(f"r{i}" for i in range(pushed))  # each answered once


def test_the_reply_pipeline_takes_the_next_frame(client: Counting) -> None:
    frames = [request(f"r{i}").frame() for i in range(3)]
    queue(client, *frames)
    online = loop(client)
    first = online._batcher.next_batch(0.01)
    client.round_trips = 0
    held = online._serve(first, take_next=True)
    assert client.round_trips == 1  # replies, acknowledgement and the next take together
    assert held == [frames[1]] and client.lrange(INFLIGHT, 0, -1) == [frames[1]]
    assert [r.id for r in replies_on(client, LISTENER)] == ["r0"]
    assert client.lrange(QUEUE, 0, -1) == [frames[2]]


def test_a_frame_taken_by_a_lost_answer_is_served_not_stranded(client: Counting) -> None:
    # A take applied whose answer was lost (redis-py retries a pipeline after a connection
    # error): the frame sits in the in-flight list unknown to the loop.
    frames = [request(f"r{i}").frame() for i in range(3)]
    queue(client, *frames)
    online = loop(client)
    first = online._batcher.next_batch(0.01)
    client.lmove(QUEUE, INFLIGHT, "RIGHT", "LEFT")  # the lost take: r1
    held = online._serve(first, take_next=True)  # takes r2 as well, and counts
    assert held == [frames[1], frames[2]]  # both, oldest first
    online._serve(held, take_next=True)
    assert sorted(r.id for r in replies_on(client, LISTENER)) == ["r0", "r1", "r2"]
    assert client.llen(INFLIGHT) == 0


class AnswerLost:
    """A client whose first non-empty pipeline is applied, then fails as a connection
    that dropped before the answer came (what redis-py retries)."""

    def __init__(self, real: fakeredis.FakeRedis) -> None:
        self.real = real
        self.lost = 0

    def pipeline(self, transaction: bool = True) -> Any:
        pipe: Any = self.real.pipeline(transaction=transaction)
        execute = pipe.execute

        def applied_then_lost() -> Any:
            results = execute()
            if results and not self.lost:
                self.lost += 1
                raise redis.ConnectionError("Connection closed by server.")
            return results

        pipe.execute = applied_then_lost
        return pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_reply_pipeline_retried_after_a_lost_answer_loses_no_frame(
    client: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outage_module.Outage, "failed", lambda self, exc: 0.0)
    frames = [request(f"r{i}").frame() for i in range(3)]
    queue(client, *frames)
    flaky = AnswerLost(client)
    online = OnlineLoop(flaky, ModelRunner(Echo()), batcher(client), INFLIGHT, clock=lambda: NOW)  # type: ignore[arg-type]
    held = online._serve(online._batcher.next_batch(0.01), take_next=True)
    assert flaky.lost == 1  # the first attempt took r1, its answer lost; the retry took r2
    assert held == [frames[1], frames[2]] and client.llen(QUEUE) == 0
    online._serve(held, take_next=False)
    ids = [r.id for r in replies_on(client, LISTENER)]
    assert sorted(set(ids)) == ["r0", "r1", "r2"] and ids.count("r0") == 2  # pushed twice
    assert client.llen(INFLIGHT) == 0


def test_several_stranded_frames_are_each_served_once(client: Counting) -> None:
    queue(client, request("r0").frame())
    client.lpush(INFLIGHT, *(request(f"r{i}").frame() for i in (1, 2, 3)))  # lost takes
    online = loop(client)  # batch_size 1: the strays come back as more than one batch
    online.start()
    try:
        popped = [client.brpop([LISTENER], timeout=10) for _ in range(4)]
    finally:
        online.stop(10)
    assert [Reply.parse(raw(p[1])).id for p in popped if p] == ["r0", "r1", "r2", "r3"]
    assert client.llen(LISTENER) == 0 and client.llen(INFLIGHT) == 0  # none twice


def test_a_stop_during_a_batch_takes_nothing_more(client: Counting) -> None:
    queue(client, *(request(f"r{i}").frame() for i in range(3)))
    holder: list[OnlineLoop] = []

    class Stopping(Echo):
        def handle(
            self, batch: list[InferenceRequest], stream: object = None
        ) -> list[InferenceReply]:
            holder[0].request_stop()  # SIGTERM while the batch runs
            return super().handle(batch)

    online = loop(client, Stopping())
    holder.append(online)
    online.start()
    online._thread.join(10)
    assert not online._thread.is_alive()
    assert [r.id for r in replies_on(client, LISTENER)] == ["r0"]  # finished its batch
    assert client.llen(QUEUE) == 2 and client.llen(INFLIGHT) == 0  # and took no more


def test_a_running_loop_answers_every_request_pushed(client: Counting) -> None:
    online = loop(client, size=3)
    online.start()
    try:
        for i in range(40):
            queue(client, request(f"r{i}").frame())
        # As a reply listener pops: each pop blocks until a reply comes (10 s at most).
        popped = [client.brpop([LISTENER], timeout=10) for _ in range(40)]
    finally:
        online.stop(10)
    ids = [Reply.parse(raw(p[1])).id for p in popped if p]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))
    assert client.llen(QUEUE) + client.llen(INFLIGHT) + client.llen(LISTENER) == 0


# -- metrics off the request path --------------------------------------------------------


def test_batch_metrics_are_recorded_after_the_replies_are_out(client: Counting) -> None:
    seen: list[tuple[int, int]] = []

    def observe(size: int, records: list[Any]) -> None:
        seen.append((size, client.llen(LISTENER)))

    queue(client, request("r1").frame(), request("r2").frame())
    serve_queued(loop(client, size=2, observe=observe))
    assert seen == [(2, 2)]  # both replies were pushed before the batch was observed


def test_a_failing_observer_costs_no_reply(client: Counting) -> None:
    def observe(size: int, records: list[Any]) -> None:
        raise RuntimeError("a metrics bug")

    queue(client, request("r1").frame())
    serve_queued(loop(client, observe=observe))
    assert [r.status for r in replies_on(client, LISTENER)] == [200]


def test_a_celery_task_batch_is_observed_before_handle_returns() -> None:
    seen: list[int] = []
    runner = ModelRunner(Echo(), observe=lambda size, records: seen.append(size))
    runner.handle([InferenceRequest("x", {}, [])])
    assert seen == [1]  # not deferred: the batch-job path has no reply pipeline to wait for
    runner.handle([InferenceRequest("y", {}, [])], defer=True)
    assert seen == [1]  # the online loop's: until it has pushed the replies
    runner.observe_deferred()
    assert seen == [1, 1]
