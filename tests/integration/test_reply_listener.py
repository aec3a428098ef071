"""An API process's reply listener across a Redis restart, over a real redis-server.

One :class:`~control.core.dispatch.Dispatcher` (an API process: one asyncio client, one
shared reply list, one listener task) has requests waiting in every state (answered,
held by the worker, queued) when its redis-server is stopped and started again, while
new requests keep arriving. The worker is a thread running a model worker's request
loop against the same Redis (take into the in-flight list, reply on the frame's reply
list addressed to its id, then acknowledge; retry through Redis errors), so that what
is tested is the API side alone.

Every request must end, each exactly once, as *answered* (200 with its own body) or
*failed* (an error the ports turn into TorchServe's 503/500/404 JSON); none may be
*lost* (no answer by its deadline, or another request's answer). With append-only
persistence the requests that waited through the restart are all answered; a Redis
that comes back empty may fail them, but must not leave any hanging.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from control.core import dispatch, keys, observed
from control.core.dispatch import Dispatcher
from control.core.envelope import Part, Reply, Request
from control.core.errors import ModelServerError
from control.core.observed import WorkerRecord, WorkerState
from control.core.redis_io import connect_async
from control.core.registry import Registry
from control.core.spec import ModelSpec
from tests.support import chaos
from tests.support.chaos import Outcome, Shot, Tally
from tests.support.processes import RestartableRedis, restartable_redis, wait_for

#: Requests waiting when Redis goes down; the worker answers ANSWERED_FIRST of them
#: first and holds the next one in flight through the restart.
WAITING = 40
ANSWERED_FIRST = 10
#: Seconds between the new requests that keep arriving around the restart, and how
#: many more are sent once Redis is back.
TRICKLE_EVERY = 0.02
AFTER = 5
#: A request without an answer by then is lost (longer than the 30 s a waiting request
#: rides out a Redis outage before its 503, so that a 503 would come first).
REQUEST_DEADLINE = dispatch.REDIS_OUTAGE_WAIT + 30.0
QUEUE = keys.online_queue("m", "1.0")


class EchoWorker(threading.Thread):
    """A model worker's online request loop for ``m`` 1.0, in a thread: answers each
    request with its own body, reply before acknowledgement in one pipeline (as
    ``workers.worker.serving`` does), and keeps its record alive every loop.

    After ``answered_first`` answers it takes one more request and holds it, in flight,
    until :attr:`gate` is set. Redis errors are retried (a frame in hand is answered once
    Redis is back); a frame left in its in-flight list by a take whose answer was lost
    is served first, as real workers do.
    """

    def __init__(self, url: str, answered_first: int, wid: str = "9000") -> None:
        super().__init__(name="echo-worker", daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=1)
        self.wid = wid
        self.inflight = keys.inflight(wid)
        self.answered_first = answered_first
        self.gate = threading.Event()
        self.holding = threading.Event()
        self.stopping = threading.Event()
        #: Request id -> replies pushed (2 when a reply's acknowledgement was lost).
        self.replies: collections.Counter[str] = collections.Counter()
        self.redis_errors = 0
        self._beat_at = 0.0

    def run(self) -> None:
        frame: bytes | None = None
        while not self.stopping.is_set():
            try:
                self._beat()
                if frame is None:
                    frame = self._take()
                    if frame is None:
                        continue
                if len(self.replies) >= self.answered_first and not self.gate.is_set():
                    self.holding.set()
                    while not self.gate.wait(0.1) and not self.stopping.is_set():
                        self._beat()  # a worker busy with its batch still heartbeats
                self._answer(frame)
                frame = None
            except (redis.ConnectionError, redis.TimeoutError):
                self.redis_errors += 1
                self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.gate.set()
        self.join(30)
        self.client.close()

    def _beat(self) -> None:
        if time.monotonic() >= self._beat_at:
            record = WorkerRecord(
                wid=self.wid, model="m", version="1.0", host="h", pid=1, gpu=-1,
                state=WorkerState.READY, started_at=0.0,
            )  # fmt: skip
            observed.publish(self.client, record, ttl=3.0)
            self._beat_at = time.monotonic() + 0.5

    def _take(self) -> bytes | None:
        stranded = self.client.lindex(self.inflight, -1)
        if stranded is not None:
            return bytes(stranded)  # type: ignore[arg-type]
        frame = self.client.blmove(QUEUE, self.inflight, 0.1, "RIGHT", "LEFT")
        return None if frame is None else bytes(frame)  # type: ignore[arg-type]

    def _answer(self, frame: bytes) -> None:
        request = Request.parse(frame)
        reply = Reply(status=200, body=request.parts[0].value).to(request.id)
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(request.reply_key, reply.frame())
        pipe.pexpire(request.reply_key, keys.REPLY_TTL_MS)
        pipe.lrem(self.inflight, 1, frame)
        pipe.execute()
        self.replies[request.id] += 1


def spec() -> ModelSpec:
    return ModelSpec(
        model_name="m", version="1.0", url="m.mar", archive="m.mar", downloaded=False,
        handler="h.py",
    )  # fmt: skip


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RestartableRedis]:
    with restartable_redis(tmp_path / "redis") as started:
        yield started


@pytest.fixture
def worker(server: RestartableRedis) -> Iterator[EchoWorker]:
    with redis.Redis.from_url(server.url) as client:
        Registry(client).register(spec(), 1, 1)
    echo = EchoWorker(server.url, ANSWERED_FIRST)
    echo.start()
    try:
        # Serving before the test pushes: requests sent before its first heartbeat would
        # all be refused at once (no worker), and none would reach it.
        with redis.Redis.from_url(server.url) as client:
            wait_for(lambda: client.exists(keys.worker(echo.wid)), 30, "the echo worker's record")
        yield echo
    finally:
        echo.stop()


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # More liveness checks and listener pops fall inside the outage (their failures are
    # what is tested); the rule is the same at any chunk.
    monkeypatch.setattr(dispatch, "BLOCK_CHUNK", 0.25)


async def one_request(dispatcher: Dispatcher, token: str) -> Shot:
    """Send one request and classify its end (``tests.support.chaos`` vocabulary)."""
    sent_at = time.monotonic()
    try:
        async with asyncio.timeout(REQUEST_DEADLINE):
            delivery = await dispatcher.send(
                "m", None, (Part("body", "text/plain", token.encode()),), {}
            )
    except TimeoutError:
        return Shot(token, sent_at, Outcome.LOST, "no answer by the deadline")
    except (ModelServerError, redis.ConnectionError, redis.TimeoutError) as exc:
        # The ports' TorchServe errors: 503 (no worker, Redis down), 500 (Worker died.),
        # 404 (a Redis that came back without the registry).
        return Shot(token, sent_at, Outcome.FAILED, type(exc).__name__)
    reply = delivery.reply
    outcome = chaos.classify(token, reply.status, reply.body)
    return Shot(token, sent_at, outcome, str(reply.status))


def tally(shots: list[Shot]) -> Tally:
    by = collections.Counter(shot.outcome for shot in shots)
    return Tally(len(shots), by[Outcome.ANSWERED], by[Outcome.FAILED], by[Outcome.LOST])


async def until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Wait without blocking the loop until ``condition()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


async def restart_under_load(
    server: RestartableRedis, worker: EchoWorker, while_down: Callable[[], None] = lambda: None
) -> tuple[list[Shot], list[Shot], int]:
    """WAITING requests waiting, and new ones arriving all along, while the Redis is
    stopped, ``while_down`` runs, and it is started again; the shots of the waiting
    requests and of the arriving ones, and how many were waiting when Redis went down."""
    client = connect_async(server.url)
    dispatcher = Dispatcher(client)
    try:
        tokens = [f"waiting-{i}-{uuid.uuid4().hex}" for i in range(WAITING)]
        waiting = [asyncio.create_task(one_request(dispatcher, t)) for t in tokens]
        await until(worker.holding.is_set, "the worker to answer some and hold one")
        await until(lambda: sum(t.done() for t in waiting) == ANSWERED_FIRST, "answers")
        arriving: list[asyncio.Task[Shot]] = []

        async def meanwhile(step: Callable[[], None]) -> None:
            running = asyncio.create_task(asyncio.to_thread(step))
            while not running.done():
                token = f"arriving-{len(arriving)}-{uuid.uuid4().hex}"
                arriving.append(asyncio.create_task(one_request(dispatcher, token)))
                await asyncio.sleep(TRICKLE_EVERY)
            await running

        await meanwhile(server.stop)
        down_with = sum(1 for task in waiting if not task.done())
        await meanwhile(while_down)
        await meanwhile(server.start)
        worker.gate.set()
        for _ in range(AFTER):  # and a few once Redis is back
            token = f"after-{uuid.uuid4().hex}"
            arriving.append(asyncio.create_task(one_request(dispatcher, token)))
        waited, arrived = await asyncio.gather(*waiting), await asyncio.gather(*arriving)
        assert not dispatcher._waiting, "a request left its waiter behind"
        # Duplicate replies (an acknowledgement lost in the restart) are popped and dropped.
        deadline = time.monotonic() + 30
        while await client.llen(dispatcher.replies):
            assert time.monotonic() < deadline, "the reply list was not drained"
            await asyncio.sleep(0.01)
        return list(waited), list(arrived), down_with
    finally:
        await dispatcher.close()
        await client.aclose()


def brief(shots: list[Shot]) -> list[str]:
    """The shots, short enough for an assertion message."""
    return [f"{shot.token.split('-')[0]}: {shot.outcome.value} ({shot.detail})" for shot in shots]


def check_each_ended_once(shots: list[Shot], expected: int) -> None:
    assert len(shots) == expected
    assert len({shot.token for shot in shots}) == expected  # one end per request


def test_a_redis_restart_with_its_data_loses_no_waiting_request(
    server: RestartableRedis, worker: EchoWorker
) -> None:
    waiting, arriving, down_with = asyncio.run(restart_under_load(server, worker))
    waited, arrived = tally(waiting), tally(arriving)
    chaos.record("reply listener: Redis restarted (append-only), requests waiting", waited, None)
    chaos.record("reply listener: Redis restarted (append-only), requests arriving", arrived, None)
    # Requests waited through the outage: one held by the worker, the rest queued.
    assert down_with == WAITING - ANSWERED_FIRST
    check_each_ended_once(waiting, WAITING)
    # Frames, the in-flight list and replies survive in the append-only file: all answered.
    assert waited == Tally(sent=WAITING, answered=WAITING, failed=0, lost=0), waiting
    check_each_ended_once(arriving, arrived.sent)
    # Those sent while Redis was down failed at once (the ports' 503) or were answered.
    assert arrived.lost == 0, brief(arriving)
    assert arrived.answered + arrived.failed == arrived.sent


#: Requests sent at once before and right after a restart (as many pooled connections).
AT_ONCE = 8


def test_requests_right_after_a_redis_restart_are_answered(
    server: RestartableRedis, worker: EchoWorker
) -> None:
    worker.gate.set()  # serve everything

    async def scenario() -> list[Shot]:
        client = connect_async(server.url)
        dispatcher = Dispatcher(client)
        try:
            warm = [one_request(dispatcher, f"warm-{uuid.uuid4().hex}") for _ in range(AT_ONCE)]
            assert tally(list(await asyncio.gather(*warm))).answered == AT_ONCE
            await asyncio.to_thread(server.stop)  # nothing in flight but the listener's pop
            await asyncio.to_thread(server.start)
            fresh = [one_request(dispatcher, f"fresh-{uuid.uuid4().hex}") for _ in range(AT_ONCE)]
            return list(await asyncio.gather(*fresh))
        finally:
            await dispatcher.close()
            await client.aclose()

    shots = asyncio.run(scenario())
    assert tally(shots) == Tally(sent=AT_ONCE, answered=AT_ONCE, failed=0, lost=0), brief(shots)


def test_a_redis_restart_without_its_data_leaves_no_request_hanging(
    server: RestartableRedis, worker: EchoWorker, tmp_path: Path
) -> None:
    def forget_everything() -> None:
        # As a Redis without persistence: it comes back with nothing.
        shutil.rmtree(tmp_path / "redis" / "appendonlydir")
        (tmp_path / "redis" / "dump.rdb").unlink(missing_ok=True)

    waiting, arriving, down_with = asyncio.run(
        restart_under_load(server, worker, forget_everything)
    )
    with redis.Redis.from_url(server.url) as client:
        assert not client.exists(keys.model("m"))  # the registry went too
    waited, arrived = tally(waiting), tally(arriving)
    chaos.record("reply listener: Redis restarted empty, requests waiting", waited, None)
    chaos.record("reply listener: Redis restarted empty, requests arriving", arrived, None)
    assert down_with == WAITING - ANSWERED_FIRST
    check_each_ended_once(waiting, WAITING)
    check_each_ended_once(arriving, arrived.sent)
    # Answered (the held request's reply may still come, as those before the restart)
    # or failed ("Worker died.", 503, 404): none hanging, none given another's answer.
    lost = [s for s in [*waiting, *arriving] if s.outcome is Outcome.LOST]
    assert waited.lost == 0 and arrived.lost == 0, lost
    assert waited.answered >= ANSWERED_FIRST
    assert waited.answered + waited.failed == WAITING
