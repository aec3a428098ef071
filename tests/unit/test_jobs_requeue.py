"""Batch jobs survive worker death, over fakeredis: the held marker a worker keeps while it
runs a chunk (``workers.worker.tasks``) and the supervisor's requeue of it
(``workers.worker.batch``).

The sender handed to :func:`requeue_held` is ``control.jobs.store.send_chunk`` on a fake Celery
app, the production path minus the broker, so the messages it records are exactly what
a submission sends.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import fakeredis
import orjson
import pytest

from control.core import keys
from control.core.celery_app import make_celery
from control.core.settings import Settings
from control.jobs.store import BATCH_TASK, JobStore, send_chunk
from tests.unit.test_jobs import FakeCelery, FakeModel, inputs, make_store
from workers.worker import batch as worker_jobs
from workers.worker import tasks as worker_tasks
from workers.worker.batch import (
    MAX_REQUEUES,
    MIN_HELD_TTL_S,
    chunk_sender,
    held_ttl,
    holding,
    requeue_held,
    run_chunk,
)
from workers.worker.tasks import register_tasks

WID = "9001"
QUEUE = keys.batch_queue("echo", "1.0")


@pytest.fixture
def celery() -> FakeCelery:
    return FakeCelery()


@pytest.fixture
def store(redis_client: fakeredis.FakeRedis, celery: FakeCelery) -> JobStore:
    return make_store(redis_client, celery)


def submit(store: JobStore, celery: FakeCelery, n: int) -> str:
    """A job of ``n`` items of version 1.0 (chunks of 16); forgets the submission's sends."""
    job_id = store.submit("echo", None, inputs(n)).job_id
    celery.sent.clear()
    return job_id


def hold(client: fakeredis.FakeRedis, job_id: str, start: int, end: int) -> None:
    """What a worker leaves behind when it dies inside a chunk."""
    client.set(keys.held(WID), orjson.dumps({"job": job_id, "start": start, "end": end}))


def sender(celery: FakeCelery) -> worker_jobs.ChunkSender:
    return functools.partial(send_chunk, celery)


def result(client: fakeredis.FakeRedis, job_id: str, index: int) -> Any:
    raw = client.hget(keys.job_results(job_id), str(index))
    return None if raw is None else orjson.loads(raw)


def test_a_held_chunk_is_sent_again_once_with_the_same_range(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job_id = submit(store, celery, 40)
    run_chunk(redis_client, FakeModel(), job_id, 16, 20)  # the dead worker got this far
    hold(redis_client, job_id, 16, 32)
    assert requeue_held(redis_client, WID, sender(celery)) == 12  # items 20..31 pending
    # The very message submission sends for that chunk, to the version's batch queue.
    assert celery.sent == [(BATCH_TASK, [job_id, 16, 32], {"queue": QUEUE, "ignore_result": True})]
    assert redis_client.get(keys.held(WID)) is None
    assert redis_client.hget(keys.job(job_id), "requeued:16") == "1"
    # Once reaped, the worker holds nothing: a second call sends nothing.
    assert requeue_held(redis_client, WID, sender(celery)) == 0
    assert len(celery.sent) == 1


def test_the_requeued_chunk_and_the_late_redelivery_count_each_item_once(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job_id = submit(store, celery, 20)
    run_chunk(redis_client, FakeModel(), job_id, 0, 5)
    hold(redis_client, job_id, 0, 16)
    requeue_held(redis_client, WID, sender(celery))
    [(_, args, _)] = celery.sent
    model = FakeModel()
    run_chunk(redis_client, model, *args)  # the fresh message, on a live worker
    assert len(model.batches) == 11  # only the items without a result ran
    # The dead worker's own message comes back after the visibility timeout: a no-op.
    assert run_chunk(redis_client, FakeModel(), job_id, 0, 16) == 0
    run_chunk(redis_client, FakeModel(), job_id, 16, 20)
    status = store.status(job_id)
    assert (status.status, status.done, status.failed) == ("succeeded", 20, 0)
    assert redis_client.hlen(keys.job_results(job_id)) == 20


def test_past_the_limit_pending_items_fail_worker_died_and_the_job_finishes(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job_id = submit(store, celery, 40)
    run_chunk(redis_client, FakeModel(), job_id, 0, 16)
    run_chunk(redis_client, FakeModel(), job_id, 32, 40)
    run_chunk(redis_client, FakeModel(), job_id, 16, 20)
    # Item 20 kills every worker that runs it: each death is reaped with the marker set.
    for _ in range(MAX_REQUEUES):
        hold(redis_client, job_id, 16, 32)
        assert requeue_held(redis_client, WID, sender(celery)) == 12
    assert len(celery.sent) == MAX_REQUEUES
    assert store.status(job_id).status == "running"
    hold(redis_client, job_id, 16, 32)
    assert requeue_held(redis_client, WID, sender(celery)) == 0
    assert len(celery.sent) == MAX_REQUEUES  # no third message
    status = store.status(job_id)
    assert (status.status, status.done, status.failed) == ("succeeded", 28, 12)
    assert status.done + status.failed == status.total
    for index in range(20, 32):
        assert result(redis_client, job_id, index) == {"status": 500, "error": "Worker died."}
    assert result(redis_client, job_id, 19) == {"status": 200, "result": {"x": 19}}
    assert redis_client.get(keys.held(WID)) is None
    # The messages still in flight change nothing any more.
    for _, args, _ in celery.sent:
        assert run_chunk(redis_client, FakeModel(), *args) == 0
    assert store.status(job_id) == status


def test_a_whole_job_failed_by_dead_workers_is_failed(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job_id = submit(store, celery, 3)
    for _ in range(MAX_REQUEUES + 1):
        hold(redis_client, job_id, 0, 3)
        requeue_held(redis_client, WID, sender(celery))
    status = store.status(job_id)
    assert (status.status, status.done, status.failed) == ("failed", 0, 3)
    assert redis_client.exists(keys.job_items(job_id)) == 0  # deleted as run_chunk does


def test_no_marker_means_nothing_to_do(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job_id = submit(store, celery, 20)
    before = redis_client.hgetall(keys.job(job_id))
    assert requeue_held(redis_client, WID, sender(celery)) == 0
    assert celery.sent == []
    assert redis_client.hgetall(keys.job(job_id)) == before


@pytest.mark.parametrize("ending", ["cancelled", "finished", "expired", "chunk done"])
def test_a_chunk_with_nothing_left_to_run_is_not_requeued(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis, ending: str
) -> None:
    job_id = submit(store, celery, 20)
    if ending == "cancelled":
        store.cancel(job_id)
    elif ending == "finished":
        run_chunk(redis_client, FakeModel(), job_id, 0, 20)
    elif ending == "expired":
        redis_client.delete(keys.job(job_id), keys.job_items(job_id))
    else:  # the worker died after recording its last batch
        run_chunk(redis_client, FakeModel(), job_id, 0, 16)
    hold(redis_client, job_id, 0, 16)
    assert requeue_held(redis_client, WID, sender(celery)) == 0
    assert celery.sent == []
    assert redis_client.get(keys.held(WID)) is None
    # No attempt counted, and no job hash re-created without a TTL.
    assert redis_client.hget(keys.job(job_id), "requeued:0") is None
    if ending == "expired":
        assert redis_client.exists(keys.job(job_id)) == 0


@pytest.mark.parametrize(
    "marker", [b"{nope", b"[1]", b'{"job": "", "start": 0, "end": 1}', b'{"job": "j", "start": 5}']
)
def test_an_unreadable_marker_is_dropped(
    celery: FakeCelery,
    redis_client: fakeredis.FakeRedis,
    marker: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_client.set(keys.held(WID), marker)
    with caplog.at_level(logging.ERROR, logger="workers.worker.batch"):
        assert requeue_held(redis_client, WID, sender(celery)) == 0
    assert celery.sent == []
    assert redis_client.get(keys.held(WID)) is None
    assert "unreadable batch chunk marker" in caplog.text


def test_a_send_that_fails_is_logged_not_raised(
    store: JobStore,
    celery: FakeCelery,
    redis_client: fakeredis.FakeRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = submit(store, celery, 20)
    hold(redis_client, job_id, 0, 16)

    def broken(job: str, queue: str, start: int, end: int) -> None:
        raise ConnectionError("broker went away")

    with caplog.at_level(logging.WARNING, logger="workers.worker.batch"):
        assert requeue_held(redis_client, WID, broken) == 0
    assert "broker went away" in caplog.text and "visibility timeout" in caplog.text
    assert redis_client.get(keys.held(WID)) is None


def test_the_chunk_sender_builds_one_celery_app_on_first_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[FakeCelery] = []

    def fake_make_celery(settings: Settings) -> FakeCelery:
        built.append(FakeCelery())
        return built[-1]

    monkeypatch.setattr("control.core.celery_app.make_celery", fake_make_celery)
    monkeypatch.setattr(worker_jobs, "_apps", {})
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    send = chunk_sender(settings)
    assert built == []  # nothing built until a chunk is sent
    send("j", QUEUE, 0, 16)
    chunk_sender(settings)("j", QUEUE, 16, 32)
    [app] = built
    assert [args for _, args, _ in app.sent] == [["j", 0, 16], ["j", 16, 32]]


def test_the_held_marker_outlives_the_slowest_chunk() -> None:
    assert held_ttl(120, 3) == MIN_HELD_TTL_S
    assert held_ttl(100, 16) == 1600


def test_holding_marks_the_chunk_for_the_block_however_it_ends(
    redis_client: fakeredis.FakeRedis,
) -> None:
    with holding(redis_client, WID, "j", 16, 32, 700):
        assert orjson.loads(redis_client.get(keys.held(WID))) == {
            "job": "j",
            "start": 16,
            "end": 32,
        }
        assert 690 < redis_client.ttl(keys.held(WID)) <= 700
    assert redis_client.get(keys.held(WID)) is None
    with pytest.raises(RuntimeError), holding(redis_client, WID, "j", 0, 16, 700):
        raise RuntimeError("boom")
    assert redis_client.get(keys.held(WID)) is None


@pytest.fixture
def batch_task(redis_client: fakeredis.FakeRedis) -> tuple[Any, FakeModel]:
    app = make_celery(Settings(redis_url="redis://127.0.0.1:1/0"))  # never connects here
    model = FakeModel()
    register_tasks(app, model, redis_client, WID, response_timeout=100)
    return app.tasks[BATCH_TASK], model


def test_the_task_holds_its_chunk_while_it_runs(
    store: JobStore,
    celery: FakeCelery,
    redis_client: fakeredis.FakeRedis,
    batch_task: tuple[Any, FakeModel],
) -> None:
    task, model = batch_task
    job_id = submit(store, celery, 20)
    seen: list[tuple[Any, int]] = []
    model.during = lambda: seen.append(
        (orjson.loads(redis_client.get(keys.held(WID))), redis_client.ttl(keys.held(WID)))
    )
    task(job_id, 0, 16)  # a direct call runs in this process
    assert len(seen) == 16
    marker, ttl = seen[0]
    assert marker == {"job": job_id, "start": 0, "end": 16}
    assert 1590 < ttl <= 1600  # held_ttl(100 s, 16 items)
    assert redis_client.get(keys.held(WID)) is None
    assert store.status(job_id).done == 16


def test_the_task_clears_its_marker_when_the_chunk_raises(
    store: JobStore,
    celery: FakeCelery,
    redis_client: fakeredis.FakeRedis,
    batch_task: tuple[Any, FakeModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task, _ = batch_task
    job_id = submit(store, celery, 20)
    held: list[Any] = []

    def failing(client: Any, model: Any, job: str, start: int, end: int) -> int:
        held.append(client.get(keys.held(WID)))
        raise RuntimeError("a bug below the task")

    monkeypatch.setattr(worker_tasks, "run_chunk", failing)
    with pytest.raises(RuntimeError, match="a bug below the task"):
        task(job_id, 0, 16)
    assert held != [None]  # it was held while the chunk ran
    assert redis_client.get(keys.held(WID)) is None


def test_a_message_that_does_not_validate_holds_nothing(
    redis_client: fakeredis.FakeRedis, batch_task: tuple[Any, FakeModel]
) -> None:
    task, _ = batch_task
    assert task("j", 5, 1)["status"] == 400
    assert redis_client.get(keys.held(WID)) is None
