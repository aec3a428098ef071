"""The API's request path over fakeredis: the one serving rule, read-your-writes routing,
and waits that last exactly as long as the request is alive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import fakeredis
import pytest

from control.core import keys, observed, redis_io
from control.core.dispatch import Dispatcher, NoWorker, QueueFull
from control.core.envelope import Part, Reply, Request
from control.core.errors import InternalServerException, ModelNotFoundException
from control.core.observed import SERVING, WorkerRecord, WorkerState
from control.core.registry import Registry
from control.core.spec import ModelSpec


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


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def client(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Liveness is checked between blocking chunks; short ones keep these tests quick.
    monkeypatch.setattr(redis_io, "BLOCK_CHUNK", 0.05)


class FakeWorker:
    """Takes frames of one version like a worker; ``answer`` decides when and how."""

    def __init__(self, client: fakeredis.FakeRedis, wid: str, version: str = "1.0") -> None:
        self.client = client
        self.wid = wid
        self.version = version
        self.taken: list[Request] = []

    def take(self, timeout: float = 5.0) -> bytes:
        # fakeredis's BLMOVE is not woken by a push from another thread: poll LMOVE.
        deadline = time.monotonic() + timeout
        queue = keys.online_queue("m", self.version)
        while (frame := self.client.lmove(queue, keys.inflight(self.wid))) is None:
            assert time.monotonic() < deadline, "nothing was queued"
            time.sleep(0.005)
        self.taken.append(Request.parse(frame))
        return bytes(frame)

    def answer(self, frame: bytes, body: bytes = b"ok") -> None:
        request = Request.parse(frame)
        self.client.lpush(keys.reply(request.id), Reply(status=200, body=body).frame())
        self.client.lrem(keys.inflight(self.wid), 1, frame)


def in_thread(work: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def registered(client: fakeredis.FakeRedis) -> Iterator[Registry]:
    registry = Registry(client)
    registry.register(spec("1.0"), 1, 1)
    yield registry


def body(part: bytes = b"x") -> tuple[Part, ...]:
    return (Part("body", "application/json", part),)


def test_the_serving_rule_is_ready_or_busy() -> None:
    assert {WorkerState.READY, WorkerState.BUSY} == SERVING
    assert [s for s in WorkerState if s.serving] == [WorkerState.READY, WorkerState.BUSY]


@pytest.mark.parametrize(
    "state", [WorkerState.STARTING, WorkerState.LOADING, WorkerState.FAILED, WorkerState.DRAINING]
)
def test_no_worker_that_can_take_requests_is_503_at_once(
    client: fakeredis.FakeRedis, registered: Registry, state: WorkerState
) -> None:
    observed.publish(client, worker("9000", state), ttl=60)
    started = time.monotonic()
    with pytest.raises(NoWorker):
        Dispatcher(client).send("m", None, body(), {})
    assert time.monotonic() - started < 1.0
    assert client.llen(keys.online_queue("m", "1.0")) == 0  # nothing was queued


def test_a_busy_worker_takes_requests(client: fakeredis.FakeRedis, registered: Registry) -> None:
    observed.publish(client, worker("9000", WorkerState.BUSY), ttl=60)
    fake = FakeWorker(client, "9000")
    thread = in_thread(lambda: fake.answer(fake.take(), b"served"))
    outcome = Dispatcher(client).send("m", None, body(), {})
    thread.join(5)
    assert (outcome.reply.status, outcome.reply.body, outcome.version) == (200, b"served", "1.0")


def test_queue_full_counts_the_online_queue_only(
    client: fakeredis.FakeRedis, registered: Registry
) -> None:
    Registry(client).register(spec("2.0", job_queue_size=2), 1, 1)
    observed.publish(client, worker("9000", WorkerState.READY, "2.0"), ttl=60)
    client.rpush(keys.batch_queue("m", "2.0"), b"a", b"b", b"c")  # batch jobs: not counted
    client.rpush(keys.online_queue("m", "2.0"), b"a", b"b")
    with pytest.raises(QueueFull):
        Dispatcher(client).send("m", "2.0", body(), {})


def test_set_default_is_seen_by_the_next_request_of_every_process(
    client: fakeredis.FakeRedis, registered: Registry
) -> None:
    registered.register(spec("2.0"), 1, 1)
    for wid, version in (("9000", "1.0"), ("9001", "2.0")):
        observed.publish(client, worker(wid, WorkerState.READY, version), ttl=60)
    processes = [Dispatcher(client), Dispatcher(client)]
    fakes = {"1.0": FakeWorker(client, "9000", "1.0"), "2.0": FakeWorker(client, "9001", "2.0")}

    def serve(version: str) -> None:
        fake = fakes[version]
        fake.answer(fake.take(), version.encode())

    for dispatcher in processes:  # both cache the default, 1.0
        thread = in_thread(lambda: serve("1.0"))
        assert dispatcher.send("m", None, body(), {}).reply.body == b"1.0"
        thread.join(5)
    registered.set_default("m", "2.0")
    for dispatcher in processes:
        thread = in_thread(lambda: serve("2.0"))
        outcome = dispatcher.send("m", None, body(), {})
        thread.join(5)
        assert (outcome.reply.body, outcome.version) == (b"2.0", "2.0")
    assert client.llen(keys.online_queue("m", "1.0")) == 0


def test_unregister_is_seen_at_once(client: fakeredis.FakeRedis, registered: Registry) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    dispatcher = Dispatcher(client)
    dispatcher.lookup("m", None)  # cached
    registered.prepare_unregister("m", None)
    registered.delete("m", "1.0")
    with pytest.raises(ModelNotFoundException):
        dispatcher.send("m", None, body(), {})
    with pytest.raises(ModelNotFoundException):
        dispatcher.lookup("m", None)  # and the stale entry is gone


def test_a_request_held_by_a_live_worker_waits_past_many_chunks(
    client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    fake = FakeWorker(client, "9000")

    def slow() -> None:
        frame = fake.take()
        time.sleep(0.5)  # ten liveness checks while the "model" runs
        fake.answer(frame, b"late but fine")

    thread = in_thread(slow)
    assert Dispatcher(client).send("m", None, body(), {}).reply.body == b"late but fine"
    thread.join(5)


def test_a_request_nobody_holds_is_answered_worker_died(
    client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    fake = FakeWorker(client, "9000")

    def vanish() -> None:
        fake.take()
        client.delete(keys.worker("9000"))  # the host died: no record, no supervisor

    thread = in_thread(vanish)
    with pytest.raises(InternalServerException) as caught:
        Dispatcher(client).send("m", None, body(), {})
    thread.join(5)
    assert caught.value.message == "Worker died."


def test_queued_requests_are_answered_503_when_the_last_worker_goes(
    client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)

    def fail_soon() -> None:
        deadline = time.monotonic() + 5
        while client.llen(keys.online_queue("m", "1.0")) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        observed.publish(client, worker("9000", WorkerState.FAILED), ttl=60)

    thread = in_thread(fail_soon)
    with pytest.raises(NoWorker):
        Dispatcher(client).send("m", None, body(), {})
    thread.join(5)
    assert client.llen(keys.online_queue("m", "1.0")) == 0  # taken off: nobody runs it later


def test_client_timeout_sets_the_deadline(client: fakeredis.FakeRedis) -> None:
    Registry(client).register(spec("1.0", client_timeout_ms=1500), 1, 1)
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    fake = FakeWorker(client, "9000")
    thread = in_thread(lambda: fake.answer(fake.take()))
    Dispatcher(client, clock=lambda: 1000.0).send("m", None, body(), {})
    thread.join(5)
    [request] = fake.taken
    assert (request.enqueued, request.deadline) == (1000.0, 1001.5)


def test_blocking_calls_never_block_forever_or_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real chunk, not the tests' short one
    assert redis_io.block_seconds(float("inf")) == redis_io.BLOCK_CHUNK
    assert redis_io.block_seconds(0.0) == redis_io.MIN_BLOCK  # 0 would mean "forever"
    assert redis_io.block_seconds(1e-9) == redis_io.MIN_BLOCK
    assert redis_io.BLOCK_CHUNK < redis_io.SOCKET_TIMEOUT


def test_refuse_queued_answers_every_waiting_request_as_no_worker(
    client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    errors: list[BaseException] = []

    def wait_for_answer() -> None:
        try:
            Dispatcher(client).send("m", None, body(), {})
        except NoWorker as exc:
            errors.append(exc)

    threads = [in_thread(wait_for_answer) for _ in range(2)]
    queue = keys.online_queue("m", "1.0")
    deadline = time.monotonic() + 5
    while client.llen(queue) < 2:
        assert time.monotonic() < deadline, "requests were not queued"
        time.sleep(0.005)
    client.lpush(queue, b"not a frame")  # dropped: nobody to tell
    assert Dispatcher(client).refuse_queued("m", "1.0") == 3
    for thread in threads:
        thread.join(5)
    assert [str(e) for e in errors] == ["version unregistered"] * 2
    assert client.llen(queue) == 0
    assert Dispatcher(client).refuse_queued("m", "1.0") == 0
