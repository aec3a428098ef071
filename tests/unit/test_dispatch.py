"""The API's asynchronous request path over fakeredis: the one serving rule, routing by
the registry as it is (read your writes, nothing cached), one round trip to enqueue,
one shared reply list per process drained by one listener, and waits that last exactly
as long as the request is alive.

The dispatcher runs on an asyncio fakeredis client; fake workers are asyncio tasks with
their own client of the same server, and answer as real ones do: on the frame's reply
list (``Request.reply_key``), addressed to its id (``Reply.to``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import fakeredis
import fakeredis.aioredis
import pytest
import redis

from control.core import dispatch, keys, observed, redis_io
from control.core.dispatch import Dispatcher, NoWorker, QueueFull, refuse_queued
from control.core.envelope import Part, Reply, Request, pack
from control.core.errors import (
    InternalServerException,
    ModelNotFoundException,
    ModelVersionNotFoundException,
)
from control.core.observed import SERVING, WorkerRecord, WorkerState
from control.core.registry import Registry
from control.core.spec import ModelSpec

#: No test here may take longer (a hang fails instead of stalling the suite).
TEST_DEADLINE = 20.0
#: How long a fake worker or a condition is waited for before the test fails.
WAIT = 5.0
#: The tests' liveness interval: short, so that many checks happen in little time.
CHUNK = 0.05


def asynchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test (fixtures and all) in a fresh event loop; it fails if
    it runs past :data:`TEST_DEADLINE` (pytest-asyncio is not a dependency).

    Not ``asyncio.wait_for``: on Python 3.11 a cancellation can be swallowed on its way
    (that very function's race), and a test stuck past its deadline would then pass.
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            task = asyncio.current_task()
            assert task is not None
            expired: list[bool] = []

            def expire() -> None:
                expired.append(True)
                task.cancel()

            deadline = asyncio.get_running_loop().call_later(TEST_DEADLINE, expire)
            try:
                await test(*args, **kwargs)
            except asyncio.CancelledError:
                if not expired:
                    raise
            finally:
                deadline.cancel()
            assert not expired, f"the test ran past its {TEST_DEADLINE} s deadline"

        asyncio.run(bounded())

    return run


async def eventually(condition: Callable[[], object], what: str) -> None:
    """Wait (without blocking the loop) until ``condition()`` is truthy; fail after WAIT."""
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT}s waiting for {what}") from None


async def eventually_async(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """:func:`eventually` for a condition that must talk to Redis."""
    try:
        async with asyncio.timeout(WAIT):
            while not await condition():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT}s waiting for {what}") from None


def spec(version: str = "1.0", **fields: object) -> ModelSpec:
    return ModelSpec(
        model_name="m", version=version, url="m.mar", archive="m.mar", downloaded=False,
        handler="h.py", **fields,  # type: ignore[arg-type]
    )  # fmt: skip


def worker(wid: str, state: WorkerState, version: str = "1.0") -> WorkerRecord:
    return WorkerRecord(
        wid=wid, model="m", version=version, host="h", pid=1, gpu=-1, state=state,
        started_at=0.0,
    )  # fmt: skip


def body(part: bytes = b"x") -> tuple[Part, ...]:
    return (Part("body", "application/json", part),)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def client(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    """A sync bytes client of the server: the registry, worker records, refuse_queued."""
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def registered(client: fakeredis.FakeRedis) -> Registry:
    registry = Registry(client)
    registry.register(spec("1.0"), 1, 1)
    return registry


@pytest.fixture(autouse=True)
def short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    # Liveness is checked (and the listener's pop returns) every BLOCK_CHUNK seconds, and
    # a failing Redis is retried every OUTAGE_PAUSE: short ones keep these tests quick.
    monkeypatch.setattr(dispatch, "BLOCK_CHUNK", CHUNK)
    monkeypatch.setattr(dispatch, "OUTAGE_PAUSE", 0.01)


class Wire:
    """Every command one asyncio client sends, recorded in order (name first); commands
    named in :attr:`failing` (or all, when it holds ``"*"``) fail with ConnectionError,
    as over a connection to a Redis that is gone."""

    def __init__(self, client: fakeredis.aioredis.FakeRedis) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.failed: list[str] = []
        self.failing: set[str] = set()
        original = client.execute_command

        async def execute(*args: Any, **options: Any) -> Any:
            name = str(args[0])
            if "*" in self.failing or name in self.failing:
                self.failed.append(name)
                raise redis.ConnectionError("Connection closed by server.")
            self.sent.append(args)
            return await original(*args, **options)

        client.execute_command = execute

    def scripts(self, sha: str) -> int:
        """How many times the script ``sha`` was run."""
        return sum(1 for c in self.sent if c[0] == "EVALSHA" and c[1] == sha)

    def besides_the_listener(self) -> list[tuple[Any, ...]]:
        return [c for c in self.sent if c[0] != "BLMPOP"]


@contextlib.asynccontextmanager
async def dispatching(
    server: fakeredis.FakeServer, **options: Any
) -> AsyncIterator[tuple[Dispatcher, Wire]]:
    """A Dispatcher (an API process) on its own asyncio client, and that client's wire.

    On a clean exit, no request may have left a waiter behind; the listener and the
    client are closed either way.
    """
    aclient = fakeredis.aioredis.FakeRedis(server=server)
    wire = Wire(aclient)
    dispatcher = Dispatcher(aclient, **options)
    try:
        yield dispatcher, wire
        assert not dispatcher._waiting, "a finished request left its waiter behind"
    finally:
        await dispatcher.close()
        await aclient.aclose()


class FakeWorker:
    """Takes frames of one version as a worker does (moved into its in-flight list) and
    answers as workers do: reply on the frame's reply list, addressed to its id, and
    acknowledgement (LREM from the in-flight list) in one transaction."""

    def __init__(self, server: fakeredis.FakeServer, wid: str, version: str = "1.0") -> None:
        self.client = fakeredis.aioredis.FakeRedis(server=server)
        self.wid = wid
        self.version = version
        self.taken: list[Request] = []

    async def take(self) -> tuple[Request, bytes]:
        queue, inflight = keys.online_queue("m", self.version), keys.inflight(self.wid)
        # fakeredis's asyncio BLMOVE does not block (it answers None at once): poll LMOVE.
        taken: list[bytes] = []

        async def moved() -> bool:
            frame = await self.client.lmove(queue, inflight, "RIGHT", "LEFT")
            taken.extend([frame] if frame is not None else [])
            return bool(taken)

        await eventually_async(moved, "a request to take")
        frame = taken[0]
        request = Request.parse(frame)
        self.taken.append(request)
        return request, bytes(frame)

    async def answer(
        self, request: Request, frame: bytes, text: bytes | None = None, **fields: Any
    ) -> None:
        """Reply 200 with ``text`` (default: the request's own body)."""
        reply = Reply(status=200, body=request.parts[0].value if text is None else text, **fields)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(request.reply_key, reply.to(request.id).frame())
            pipe.pexpire(request.reply_key, keys.REPLY_TTL_MS)
            pipe.lrem(keys.inflight(self.wid), 1, frame)
            await pipe.execute()

    async def serve(self, count: int = 1, text: bytes | None = None) -> None:
        """Take and answer ``count`` requests, one at a time."""
        for _ in range(count):
            await self.answer(*(await self.take()), text=text)

    async def close(self) -> None:
        await self.client.aclose()


@contextlib.asynccontextmanager
async def fake_worker(
    server: fakeredis.FakeServer, wid: str = "9000", version: str = "1.0"
) -> AsyncIterator[FakeWorker]:
    fake = FakeWorker(server, wid, version)
    try:
        yield fake
    finally:
        await fake.close()


async def both(send: Awaitable[dispatch.Delivery], work: Awaitable[None]) -> dispatch.Delivery:
    """A request and the fake worker's part, run together; the request's delivery."""
    delivery, _ = await asyncio.gather(send, work)
    return delivery


# -- the serving rule and the enqueue script ---------------------------------------------


def test_the_serving_rule_is_ready_or_busy() -> None:
    assert {WorkerState.READY, WorkerState.BUSY} == SERVING
    assert [s for s in WorkerState if s.serving] == [WorkerState.READY, WorkerState.BUSY]


@pytest.mark.parametrize(
    "state",
    [WorkerState.STARTING, WorkerState.LOADING, WorkerState.FAILED, WorkerState.DRAINING, None],
)
@asynchronous
async def test_no_worker_that_can_take_requests_is_503_at_once(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    state: WorkerState | None,
) -> None:
    if state is None:  # a worker whose record expired: only its index entry is left
        client.sadd(keys.workers("m", "1.0"), "9000")
    else:
        observed.publish(client, worker("9000", state), ttl=60)
    async with dispatching(server) as (dispatcher, wire):
        with pytest.raises(NoWorker):
            await dispatcher.send("m", None, body(), {})
        # At once: the push script refused it; no liveness check ever ran.
        assert wire.scripts(dispatcher._alive.sha) == 0
        assert {c[0] for c in wire.besides_the_listener()} <= {"EVALSHA", "SCRIPT LOAD"}
    assert client.llen(keys.online_queue("m", "1.0")) == 0  # nothing was queued
    if state is None:
        assert client.smembers(keys.workers("m", "1.0")) == set()  # the stale entry pruned


@asynchronous
async def test_a_busy_worker_takes_requests(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.BUSY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        outcome = await both(dispatcher.send("m", None, body(), {}), fake.serve(text=b"served"))
    assert (outcome.reply.status, outcome.reply.body, outcome.version) == (200, b"served", "1.0")


@asynchronous
async def test_the_frame_names_the_shared_reply_list_and_no_deadline(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with (
        dispatching(server, clock=lambda: 1000.0, listener="api-1") as (dispatcher, _),
        fake_worker(server) as fake,
    ):

        async def work() -> None:
            request, frame = await fake.take()
            await fake.answer(request, frame, dequeued=1002.5)

        headers = {"explain": "False"}
        outcome = await both(dispatcher.send("m", None, body(b"in"), headers, "rid-1"), work())
    [request] = fake.taken
    assert (request.id, request.reply_to, request.reply_key) == (
        "rid-1", keys.replies("api-1"), keys.replies("api-1"),
    )  # fmt: skip
    # The worker applies clientTimeoutInMills: the API sends no deadline of its own.
    assert (request.enqueued, request.deadline) == (1000.0, 0.0)
    assert (request.headers, request.parts, request.kind) == (headers, body(b"in"), "predict")
    assert (outcome.queue_seconds, outcome.reply.id, outcome.version) == (2.5, "rid-1", "1.0")


def test_every_process_has_its_own_reply_list(server: fakeredis.FakeServer) -> None:
    aclient = fakeredis.aioredis.FakeRedis(server=server)
    ids = {Dispatcher(aclient).listener_id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 32 for i in ids)  # 128 random bits, hex
    assert Dispatcher(aclient, listener="x").replies == keys.replies("x")


@asynchronous
async def test_queue_full_counts_the_online_queue_only(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    registered.register(spec("2.0", job_queue_size=2), 1, 1)
    observed.publish(client, worker("9000", WorkerState.READY, "2.0"), ttl=60)
    client.rpush(keys.batch_queue("m", "2.0"), b"a", b"b", b"c")  # batch jobs: not counted
    client.rpush(keys.online_queue("m", "2.0"), b"a", b"b")
    async with dispatching(server) as (dispatcher, _):
        with pytest.raises(QueueFull):
            await dispatcher.send("m", "2.0", body(), {})
    assert client.llen(keys.online_queue("m", "2.0")) == 2


@asynchronous
async def test_unknown_models_and_versions_are_torchserve_404s(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _):
        with pytest.raises(ModelNotFoundException) as model:
            await dispatcher.send("nope", None, body(), {})
        with pytest.raises(ModelVersionNotFoundException) as version:
            await dispatcher.send("m", "9.9", body(), {})
    assert model.value.message == "Model not found: nope"
    assert version.value.message == "Model version: 9.9 does not exist for model: m"
    assert client.keys(f"{keys.PREFIX}:q:*") == []


@asynchronous
async def test_lookup_answers_the_version_and_the_404s(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    registered.register(spec("2.0"), 1, 1)
    # No worker at all: lookup routes nothing, so it needs none.
    async with dispatching(server) as (dispatcher, _):
        assert await dispatcher.lookup("m", None) == "1.0"
        assert await dispatcher.lookup("m", "2.0") == "2.0"
        registered.set_default("m", "2.0")
        assert await dispatcher.lookup("m", None) == "2.0"
        with pytest.raises(ModelNotFoundException) as unnamed:
            await dispatcher.lookup("nope", None)
        with pytest.raises(ModelNotFoundException) as named:
            await dispatcher.lookup("nope", "1.0")
        with pytest.raises(ModelVersionNotFoundException) as version:
            await dispatcher.lookup("m", "9.9")
    assert unnamed.value.message == named.value.message == "Model not found: nope"
    assert version.value.message == "Model version: 9.9 does not exist for model: m"
    assert client.keys(f"{keys.PREFIX}:q:*") == []


@asynchronous
async def test_one_round_trip_to_enqueue(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long chunk: no liveness check can run before the fake worker's prompt answer.
    monkeypatch.setattr(dispatch, "BLOCK_CHUNK", 5.0)
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:
        await both(dispatcher.send("m", None, body(), {}), fake.serve())  # loads the script
        wire.sent.clear()
        outcome = await both(dispatcher.send("m", None, body(b"2"), {}), fake.serve())
        sent = wire.besides_the_listener()
        popped = [c for c in wire.sent if c[0] == "BLMPOP"]
    assert outcome.reply.body == b"2"
    # Exactly one command from the request itself: the push script (resolve, check,
    # bound, push); its reply came by the listener's pops of the shared list.
    assert [c[:2] for c in sent] == [("EVALSHA", dispatcher._push.sha)]
    assert popped and all(c[3] == dispatcher.replies for c in popped)


# -- read your writes: routing by the registry as it is ------------------------------------


@asynchronous
async def test_set_default_is_seen_by_the_next_request_of_every_process(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    registered.register(spec("2.0"), 1, 1)
    for wid, version in (("9000", "1.0"), ("9001", "2.0")):
        observed.publish(client, worker(wid, WorkerState.READY, version), ttl=60)
    async with (
        dispatching(server) as (first, _),
        dispatching(server) as (second, _),
        fake_worker(server, "9000", "1.0") as old,
        fake_worker(server, "9001", "2.0") as new,
    ):
        for process in (first, second):
            outcome = await both(process.send("m", None, body(), {}), old.serve(text=b"1.0"))
            assert (outcome.reply.body, outcome.version) == (b"1.0", "1.0")
        registered.set_default("m", "2.0")
        for process in (first, second):
            outcome = await both(process.send("m", None, body(), {}), new.serve(text=b"2.0"))
            assert (outcome.reply.body, outcome.version) == (b"2.0", "2.0")
    assert (len(old.taken), len(new.taken)) == (2, 2)  # from each version's own queue
    assert client.llen(keys.online_queue("m", "1.0")) == 0


@asynchronous
async def test_a_scale_changes_nothing_a_request_was_routed_by(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        await both(dispatcher.send("m", None, body(b"a"), {}), fake.serve())
        revision = registered.revision()
        registered.scale("m", None, 3, 3)
        assert registered.revision() > revision  # a write of desired state...
        outcome = await both(dispatcher.send("m", None, body(b"b"), {}), fake.serve())
    # ...that nothing on the request path had cached, so nothing is refused or re-read.
    assert (outcome.reply.body, outcome.version) == (b"b", "1.0")


@asynchronous
async def test_unregister_is_seen_at_once(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    registered.register(spec("2.0"), 1, 1)
    for wid, version in (("9000", "1.0"), ("9001", "2.0")):
        observed.publish(client, worker(wid, WorkerState.READY, version), ttl=60)
    async with dispatching(server) as (dispatcher, _):
        assert await dispatcher.lookup("m", "2.0") == "2.0"
        registered.prepare_unregister("m", "2.0")
        registered.delete("m", "2.0")
        with pytest.raises(ModelVersionNotFoundException):
            await dispatcher.send("m", "2.0", body(), {})
        assert await dispatcher.lookup("m", None) == "1.0"
        registered.prepare_unregister("m", None)
        registered.delete("m", "1.0")
        with pytest.raises(ModelNotFoundException):
            await dispatcher.send("m", None, body(), {})
        with pytest.raises(ModelNotFoundException):
            await dispatcher.lookup("m", None)
    assert client.keys(f"{keys.PREFIX}:q:*") == []


# -- the shared reply list and its listener ------------------------------------------------


@asynchronous
async def test_concurrent_requests_share_one_reply_list_and_each_gets_its_own_reply(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    count = 40
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        sends = [
            asyncio.create_task(dispatcher.send("m", None, body(f'"r{i}"'.encode()), {}))
            for i in range(count)
        ]
        taken = [await fake.take() for _ in range(count)]
        random.Random(11).shuffle(taken)  # replies come back in any order
        for request, frame in taken:
            await fake.answer(request, frame)  # its own body back
        outcomes = await asyncio.gather(*sends)
        assert client.llen(dispatcher.replies) == 0
    assert [o.reply.body for o in outcomes] == [f'"r{i}"'.encode() for i in range(count)]
    assert {r.reply_to for r in fake.taken} == {dispatcher.replies}
    assert len({r.id for r in fake.taken}) == count


@asynchronous
async def test_two_processes_never_get_each_others_replies(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with (
        dispatching(server) as (first, _),
        dispatching(server) as (second, _),
        fake_worker(server) as fake,
    ):
        assert first.replies != second.replies
        # Even with the same request ids in both: each reply goes to its sender's list.
        sends = [
            asyncio.create_task(process.send("m", None, body(name), {}, request_id=f"id-{i}"))
            for process, name in ((first, b"first"), (second, b"second"))
            for i in range(3)
        ]
        await fake.serve(6)
        outcomes = await asyncio.gather(*sends)
    assert [o.reply.body for o in outcomes] == [b"first"] * 3 + [b"second"] * 3


@asynchronous
async def test_a_reply_for_nobody_is_dropped_and_disturbs_no_one(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        first = await both(dispatcher.send("m", None, body(b"a"), {}), fake.serve())
        [answered] = fake.taken
        # A second reply to an answered request (a frame run twice) and one to a request
        # this process never sent.
        for rid in (answered.id, "nobody"):
            client.lpush(dispatcher.replies, Reply(status=200, body=b"stale").to(rid).frame())
        await eventually(lambda: client.llen(dispatcher.replies) == 0, "the strays popped")
        second = await both(dispatcher.send("m", None, body(b"b"), {}), fake.serve())
    assert (first.reply.body, second.reply.body) == (b"a", b"b")


@asynchronous
async def test_a_malformed_reply_is_logged_and_dropped_and_the_listener_goes_on(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    malformed = [b"garbage", pack({"id": "x"}), pack({"id": "x", "status": 99}), b"\0\0\0\x09[1]"]
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        with caplog.at_level(logging.ERROR, logger=dispatch.__name__):
            task = asyncio.create_task(dispatcher.send("m", None, body(b"fine"), {}))
            request, frame = await fake.take()
            client.lpush(dispatcher.replies, *malformed)  # popped first: RIGHT end
            await fake.answer(request, frame)
            outcome = await task
    assert outcome.reply.body == b"fine"
    dropped = [r for r in caplog.records if "dropping a malformed reply" in r.getMessage()]
    assert len(dropped) == len(malformed)


@asynchronous
async def test_the_listener_survives_redis_errors(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:
        with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
            wire.failing = {"BLMPOP"}  # the listener's connection is lost
            task = asyncio.create_task(dispatcher.send("m", None, body(b"kept"), {}))
            await fake.serve()
            # The reply waits in the list; the request's liveness checks find it there.
            await eventually(lambda: wire.failed.count("BLMPOP") >= 5, "failing pops")
            checks = wire.scripts(dispatcher._alive.sha)
            await eventually(lambda: wire.scripts(dispatcher._alive.sha) >= checks + 2, "checks")
            assert not task.done()
            wire.failing = set()  # Redis is back
            outcome = await task
    assert outcome.reply.body == b"kept"
    warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per retry


@asynchronous
async def test_the_listener_logs_a_bug_and_goes_on(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registered.register(spec("2.0"), 1, 1)  # no worker: a request fails, the listener runs
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        resolve = dispatcher._resolve
        calls = [0]

        def broken_once(frames: list[bytes]) -> None:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("a bug")
            resolve(frames)

        monkeypatch.setattr(dispatcher, "_resolve", broken_once)
        client.lpush(dispatcher.replies, Reply(status=200).to("nobody").frame())
        with caplog.at_level(logging.ERROR, logger=dispatch.__name__):
            with pytest.raises(NoWorker):
                await dispatcher.send("m", "2.0", body(), {})
            await eventually(lambda: calls[0] == 1, "the listener to pop the stray reply")
            outcome = await both(dispatcher.send("m", None, body(b"after"), {}), fake.serve())
    assert outcome.reply.body == b"after"
    assert calls[0] >= 2
    assert [r.getMessage() for r in caplog.records] == ["reply listener: unexpected error"]


@asynchronous
async def test_close_stops_the_listener_even_if_a_cancellation_is_swallowed(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with dispatching(server) as (dispatcher, _):
        pops: list[str] = []

        async def pop_swallowing_once(*args: Any, **kwargs: Any) -> None:
            pops.append("started")
            try:
                await asyncio.sleep(WAIT)
            except asyncio.CancelledError:
                if "swallowed" in pops:
                    raise
                # What asyncio.wait_for does on Python 3.11 (redis-py sends through it)
                # when the cancellation lands as the send completes.
                pops.append("swallowed")

        monkeypatch.setattr(dispatcher._r, "blmpop", pop_swallowing_once)
        with pytest.raises(ModelNotFoundException):
            await dispatcher.send("nope", None, body(), {})  # the listener starts
        listener = dispatcher._task
        assert listener is not None
        await eventually(lambda: pops, "the listener's pop")
        await dispatcher.close()
        assert listener.cancelled()
        assert pops.count("swallowed") == 1 and pops.count("started") == 2
        await dispatcher.close()  # closing twice is harmless


@asynchronous
async def test_a_reply_popped_but_not_yet_resolved_is_not_a_lost_request(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The barrier of ``_found_nowhere``: a liveness check that runs after the listener
    has popped the reply (it is in no list any more) but before the listener resolves it
    finds the request nowhere; the request must wait for that pop, not die."""
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        aclient = dispatcher._r
        release, popped = asyncio.Event(), asyncio.Event()
        pop = aclient.blmpop

        async def held_pop(*args: Any, **kwargs: Any) -> Any:
            result = await pop(*args, **kwargs)
            if result:  # the reply is out of Redis, in this process only
                popped.set()
                await release.wait()
            return result

        monkeypatch.setattr(aclient, "blmpop", held_pop)
        verdicts: list[int] = []
        nowhere = asyncio.Event()
        alive = dispatcher._alive

        async def recorded_alive(**kwargs: Any) -> Any:
            verdict = await alive(**kwargs)
            verdicts.append(int(verdict))
            if int(verdict) == 0:
                nowhere.set()
            return verdict

        monkeypatch.setattr(dispatcher, "_alive", recorded_alive)
        task = asyncio.create_task(dispatcher.send("m", None, body(b"in time"), {}))
        await fake.serve()
        await popped.wait()
        await nowhere.wait()
        # The request ran on from its "found nowhere" verdict until it had to wait: it
        # waits for the listener's pop in progress instead of answering "Worker died.".
        assert not task.done()
        release.set()
        outcome = await task
    assert outcome.reply.body == b"in time"
    assert 0 in verdicts


@asynchronous
async def test_a_reply_before_the_push_is_answered_is_not_lost(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    """The waiter exists before the push: a worker (and the listener) can be done with
    a request before the push script's answer reaches its sender."""
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:
        await both(dispatcher.send("m", None, body(), {}), fake.serve())  # loads the script
        execute = dispatcher._r.execute_command
        resolved = asyncio.Event()

        async def slow_answer(*args: Any, **options: Any) -> Any:
            result = await execute(*args, **options)
            if args[:2] == ("EVALSHA", dispatcher._push.sha):
                await fake.serve()
                # The listener popped and resolved the reply before the push "returns".
                waiters = list(dispatcher._waiting.values())
                await eventually(lambda: waiters and all(w.done() for w in waiters), "the pop")
                resolved.set()
            return result

        dispatcher._r.execute_command = slow_answer  # type: ignore[method-assign]
        outcome = await dispatcher.send("m", None, body(b"early"), {})
        assert resolved.is_set()
        assert wire.scripts(dispatcher._alive.sha) == 0  # answered without a check
    assert outcome.reply.body == b"early"


# -- waits that last exactly as long as the request lives ---------------------------------


@asynchronous
async def test_a_request_held_by_a_live_worker_waits_past_many_checks(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:

        async def slow() -> None:
            request, frame = await fake.take()
            # The "model" runs through ten liveness checks, then answers.
            await eventually(lambda: wire.scripts(dispatcher._alive.sha) >= 10, "checks")
            await fake.answer(request, frame, b"late but fine")

        outcome = await both(dispatcher.send("m", None, body(), {}), slow())
    assert outcome.reply.body == b"late but fine"


@asynchronous
async def test_a_draining_worker_still_answers_the_request_it_holds(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:

        async def drain() -> None:
            request, frame = await fake.take()
            observed.publish(client, worker("9000", WorkerState.DRAINING), ttl=60)
            await eventually(lambda: wire.scripts(dispatcher._alive.sha) >= 3, "checks")
            await fake.answer(request, frame, b"finished the batch")

        outcome = await both(dispatcher.send("m", None, body(), {}), drain())
    assert outcome.reply.body == b"finished the batch"


@asynchronous
async def test_a_request_nobody_holds_is_answered_worker_died(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:

        async def vanish() -> None:
            await fake.take()
            client.delete(keys.worker("9000"))  # the host died: no record, no supervisor

        with pytest.raises(InternalServerException) as caught:
            await both(dispatcher.send("m", None, body(), {}), vanish())
    assert caught.value.message == "Worker died."


@asynchronous
async def test_a_request_redis_lost_is_answered_worker_died(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _):
        task = asyncio.create_task(dispatcher.send("m", None, body(), {}))
        queue = keys.online_queue("m", "1.0")
        await eventually(lambda: client.llen(queue) == 1, "queued")
        client.delete(queue)  # Redis restarted without its data (the worker came back)
        with pytest.raises(InternalServerException) as caught:
            await task
    assert caught.value.message == "Worker died."


@asynchronous
async def test_queued_requests_are_answered_503_when_the_last_worker_goes(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    queue = keys.online_queue("m", "1.0")
    async with dispatching(server) as (dispatcher, _):
        sends = [asyncio.create_task(dispatcher.send("m", None, body(), {})) for _ in range(3)]
        await eventually(lambda: client.llen(queue) == 3, "queued")
        observed.publish(client, worker("9000", WorkerState.FAILED), ttl=60)
        results = await asyncio.gather(*sends, return_exceptions=True)
    assert [type(r) for r in results] == [NoWorker] * 3
    assert client.llen(queue) == 0  # taken off: nobody runs them later


@asynchronous
async def test_refuse_queued_answers_every_waiting_request_as_no_worker(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    queue = keys.online_queue("m", "1.0")
    async with dispatching(server) as (first, _), dispatching(server) as (second, _):
        sends = [
            asyncio.create_task(process.send("m", None, body(), {}))
            for process in (first, second, second)
        ]
        await eventually(lambda: client.llen(queue) == 3, "queued")
        client.lpush(queue, b"not a frame")  # dropped: nobody to tell
        assert refuse_queued(client, "m", "1.0") == 4
        results = await asyncio.gather(*sends, return_exceptions=True)
    assert [(type(r), str(r)) for r in results] == [(NoWorker, "version unregistered")] * 3
    assert client.llen(queue) == 0
    assert refuse_queued(client, "m", "1.0") == 0


# -- a Redis outage -------------------------------------------------------------------------


@asynchronous
async def test_a_waiting_request_rides_out_a_redis_outage(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:
        task = asyncio.create_task(dispatcher.send("m", None, body(b"survived"), {}))
        request, frame = await fake.take()
        wire.failing = {"*"}  # the API process loses Redis: its checks and its pops fail
        await eventually(lambda: wire.failed.count("EVALSHA") >= 3, "failed checks")
        await eventually(lambda: "BLMPOP" in wire.failed, "failed pops")
        await fake.answer(request, frame)  # the worker answers meanwhile: the reply is kept
        assert not task.done()
        wire.failing = set()
        outcome = await task
    assert outcome.reply.body == b"survived"


@asynchronous
async def test_a_long_outage_ends_the_wait_with_the_redis_error(
    server: fakeredis.FakeServer,
    client: fakeredis.FakeRedis,
    registered: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "REDIS_OUTAGE_WAIT", 0.3)
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:
        task = asyncio.create_task(dispatcher.send("m", None, body(), {}))
        await fake.take()
        wire.failing = {"*"}
        # The ports turn the Redis error into their 503 (control.http.common).
        with pytest.raises(redis.ConnectionError):
            await task
        assert wire.failed.count("EVALSHA") >= 2  # it was ridden out for a while first


@asynchronous
async def test_an_enqueue_during_an_outage_fails_at_once(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, wire):
        wire.failing = {"EVALSHA"}
        with pytest.raises(redis.ConnectionError):
            await dispatcher.send("m", None, body(), {})
        assert wire.failed == ["EVALSHA"]  # not retried: the client gets its 503 now
    assert client.llen(keys.online_queue("m", "1.0")) == 0


@pytest.mark.parametrize("error", [redis.ConnectionError, redis.TimeoutError])
@asynchronous
async def test_the_outage_rule_swallows_redis_errors_for_a_while(
    error: type[redis.RedisError],
) -> None:
    now = [0.0]
    outage = dispatch._Outage(clock=lambda: now[0])
    for _ in range(3):  # swallowed: the request still lives in Redis
        async with outage.tolerated():
            raise error("down")
    now[0] += dispatch.REDIS_OUTAGE_WAIT - 1
    async with outage.tolerated():
        raise error("still down, not for long enough")
    async with outage.tolerated():
        pass  # Redis is back: the outage is over, and the next one starts afresh
    now[0] += dispatch.REDIS_OUTAGE_WAIT
    async with outage.tolerated():
        raise error("a new outage")
    now[0] += dispatch.REDIS_OUTAGE_WAIT
    with pytest.raises(error):
        async with outage.tolerated():
            raise error("down too long")
    with pytest.raises(ValueError):
        async with outage.tolerated():
            raise ValueError("not an outage")


def test_blocking_calls_never_block_forever_or_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real chunk, not the tests' short one
    assert redis_io.block_seconds(float("inf")) == redis_io.BLOCK_CHUNK
    assert redis_io.block_seconds(0.0) == redis_io.MIN_BLOCK  # 0 would mean "forever"
    assert redis_io.block_seconds(1e-9) == redis_io.MIN_BLOCK
    assert redis_io.BLOCK_CHUNK < redis_io.SOCKET_TIMEOUT
    # The listener's pop and the liveness interval are the same bounded chunk.
    assert dispatch.BLOCK_CHUNK == redis_io.BLOCK_CHUNK
