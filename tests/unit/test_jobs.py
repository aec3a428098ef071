"""Batch jobs over fakeredis: the store (``control.jobs.store``) and chunk runs
(``workers.worker.batch``).

A fake Celery app records the chunks the store queues; :func:`drain` plays the workers
by running each recorded chunk through :func:`workers.worker.batch.run_chunk` in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fakeredis
import orjson
import pytest

from control.core import keys
from control.core.celery_app import make_celery
from control.core.errors import (
    BadRequestException,
    JobNotFoundException,
    ModelNotFoundException,
    ModelVersionNotFoundException,
    ServiceUnavailableException,
)
from control.core.registry import Registry
from control.core.settings import Settings
from control.core.spec import ModelSpec
from control.core.timestamps import iso_time
from control.jobs.store import BATCH_TASK, DEFAULT_TTL_S, JobStore, chunk_size, chunks
from workers.handling.types import HandlerFailure, InferenceReply, InferenceRequest
from workers.worker import batch as worker_jobs
from workers.worker.batch import run_chunk
from workers.worker.tasks import register_tasks

NOW = 1_800_000_000.0


class FakeCelery:
    """Records ``send_task`` calls instead of publishing them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], dict[str, Any]]] = []

    def send_task(self, name: str, args: Any = None, **options: Any) -> None:
        self.sent.append((name, list(args), options))


Reply = Callable[[InferenceRequest], InferenceReply]


def echo(request: InferenceRequest) -> InferenceReply:
    return InferenceReply(200, "", {}, None, request.parameters[0].value)


class FakeModel:
    """Echoes each body; fails a whole batch holding an input equal to ``b'"boom"'``."""

    def __init__(self, reply: Reply = echo) -> None:
        self.batches: list[list[str]] = []
        self.reply = reply
        self.during: Callable[[], None] | None = None

    def handle(self, batch: list[InferenceRequest]) -> list[InferenceReply]:
        self.batches.append([r.request_id for r in batch])
        if self.during is not None:
            self.during()
        if any(r.parameters[0].value == b'"boom"' for r in batch):
            raise HandlerFailure(503, "Prediction failed")
        return [self.reply(r) for r in batch]


@pytest.fixture
def celery() -> FakeCelery:
    return FakeCelery()


def make_store(client: fakeredis.FakeRedis, celery: Any) -> JobStore:
    """A store over ``client`` where model ``echo`` has versions 1.0 (batch size 1,
    the default) and 2.0 (batch size 4)."""
    registry = Registry(client)
    for version, batch_size in (("1.0", 1), ("2.0", 4)):
        spec = ModelSpec(
            "echo", version, "echo.mar", "echo.mar", False, "h.py", batch_size=batch_size
        )
        registry.register(spec, 1, 1)
    return JobStore(client, celery, clock=lambda: NOW)


@pytest.fixture
def store(redis_client: fakeredis.FakeRedis, celery: FakeCelery) -> JobStore:
    return make_store(redis_client, celery)


def inputs(n: int) -> list[bytes]:
    return [orjson.dumps({"x": i}) for i in range(n)]


def drain(client: fakeredis.FakeRedis, celery: FakeCelery, model: FakeModel) -> None:
    """Run every queued chunk, as the model's workers would."""
    while celery.sent:
        _, (job_id, start, end), _ = celery.sent.pop(0)
        run_chunk(client, model, job_id, start, end)


def test_chunking_rules() -> None:
    assert chunk_size(1) == 16 and chunk_size(4) == 4
    assert list(chunks(40, 16)) == [(0, 16), (16, 32), (32, 40)]
    assert list(chunks(0, 16)) == []
    assert iso_time(NOW) == "2027-01-15T08:00:00.000Z"


def test_submit_stores_the_job_and_queues_its_chunks(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    status = store.submit("echo", None, inputs(40))
    assert (status.status, status.total, status.version) == ("queued", 40, "1.0")
    assert len(status.job_id) == 32
    job = status.job_id
    assert [args for _, args, _ in celery.sent] == [[job, 0, 16], [job, 16, 32], [job, 32, 40]]
    assert {name for name, _, _ in celery.sent} == {BATCH_TASK}
    assert all(
        opts == {"queue": keys.batch_queue("echo", "1.0"), "ignore_result": True}
        for _, _, opts in celery.sent
    )
    assert redis_client.hget(keys.job_items(job), "39") == '{"x":39}'
    assert redis_client.hget(keys.job(job), "batch_size") == "1"
    for key in (keys.job(job), keys.job_items(job)):
        assert DEFAULT_TTL_S - 5 < redis_client.ttl(key) <= DEFAULT_TTL_S
    assert store.status(job).to_json() == {
        "jobId": job,
        "model": "echo",
        "version": "1.0",
        "status": "queued",
        "total": 40,
        "done": 0,
        "failed": 0,
        "created": "2027-01-15T08:00:00.000Z",
        "expires": "2027-01-16T08:00:00.000Z",
    }


def test_a_job_runs_in_batches_and_reports_results_in_order(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", "2.0", inputs(10)).job_id
    assert [args[1:] for _, args, _ in celery.sent] == [[0, 4], [4, 8], [8, 10]]
    model = FakeModel()
    drain(redis_client, celery, model)
    assert [len(b) for b in model.batches] == [4, 4, 2]
    assert model.batches[0][0] == f"{job}:0"
    status = store.status(job)
    assert (status.status, status.done, status.failed) == ("succeeded", 10, 0)
    assert store.results(job, 0, 100) == [
        {"index": i, "status": 200, "result": {"x": i}} for i in range(10)
    ]
    assert not redis_client.exists(keys.job_items(job))  # inputs are dropped once finished
    assert 0 < redis_client.ttl(keys.job_results(job)) <= DEFAULT_TTL_S


def test_unknown_models_versions_and_jobs_are_404s(store: JobStore) -> None:
    with pytest.raises(ModelNotFoundException) as missing:
        store.submit("nope", None, inputs(1))
    assert missing.value.message == "Model not found: nope"
    with pytest.raises(ModelVersionNotFoundException) as missing_version:
        store.submit("echo", "9.9", inputs(1))
    assert missing_version.value.message == "Model version: 9.9 does not exist for model: echo"
    for job_id in ("0" * 32, "not-a-job", "../../etc"):
        with pytest.raises(JobNotFoundException):
            store.status(job_id)
        with pytest.raises(JobNotFoundException):
            store.cancel(job_id)
        with pytest.raises(JobNotFoundException):
            store.results(job_id, 0, 10)


def test_empty_and_non_utf8_inputs_are_refused(store: JobStore, celery: FakeCelery) -> None:
    with pytest.raises(BadRequestException, match="at least one input"):
        store.submit("echo", None, [])
    with pytest.raises(BadRequestException, match="Input 1 is not UTF-8"):
        store.submit("echo", None, [b"1", b"\xff"])
    assert celery.sent == []


def test_an_expired_job_is_gone_and_its_chunks_are_skipped(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", None, inputs(3)).job_id
    redis_client.delete(keys.job(job), keys.job_items(job))  # what expiry does
    model = FakeModel()
    drain(redis_client, celery, model)
    assert model.batches == []
    with pytest.raises(JobNotFoundException):
        store.status(job)


def test_results_page_with_pending_items(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", None, inputs(40)).job_id
    _, (_, start, end), _ = celery.sent[1]
    run_chunk(redis_client, FakeModel(), job, start, end)  # only items 16..31 ran
    assert store.status(job).status == "running"
    page, next_offset = store.results_page(job, 10, 10)
    assert next_offset == 20
    assert page[5] == {"index": 15, "status": None}
    assert page[6] == {"index": 16, "status": 200, "result": {"x": 16}}
    assert store.results_page(job, 35, 10) == (
        [{"index": i, "status": None} for i in range(35, 40)],
        None,
    )
    assert store.results_page(job, 40, 10) == ([], None)
    assert store.results_page(job, -5, 2)[0][0]["index"] == 0
    assert store.results(job, 0, 0) == []


def test_cancel_skips_chunks_not_yet_run(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", None, inputs(40)).job_id
    model = FakeModel()
    _, (_, start, end), _ = celery.sent.pop(0)
    run_chunk(redis_client, model, job, start, end)
    status = store.cancel(job)
    assert (status.status, status.done) == ("cancelled", 16)
    assert not redis_client.exists(keys.job_items(job))
    drain(redis_client, celery, model)
    assert len(model.batches) == 16  # nothing ran after the cancel
    assert store.status(job).status == "cancelled"
    assert store.cancel(job).status == "cancelled"  # again: no change
    assert store.results(job, 15, 2) == [
        {"index": 15, "status": 200, "result": {"x": 15}},
        {"index": 16, "status": None},
    ]


def test_cancel_during_a_chunk_stops_it_after_the_current_batch(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", None, inputs(16)).job_id
    model = FakeModel()

    def cancel_at_third_batch() -> None:
        if len(model.batches) == 3:
            store.cancel(job)

    model.during = cancel_at_third_batch
    assert run_chunk(redis_client, model, job, 0, 16) == 3
    status = store.status(job)
    assert (status.status, status.done) == ("cancelled", 3)


def test_cancel_leaves_a_finished_job_alone(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", None, inputs(2)).job_id
    drain(redis_client, celery, FakeModel())
    assert store.cancel(job).status == "succeeded"


def test_a_redelivered_chunk_is_not_run_or_counted_twice(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", None, inputs(40)).job_id
    model = FakeModel()
    assert run_chunk(redis_client, model, job, 0, 16) == 16
    assert run_chunk(redis_client, model, job, 0, 16) == 0  # results exist: skipped
    assert store.status(job).done == 16
    assert len(model.batches) == 16


def test_a_chunk_racing_its_duplicate_counts_each_item_once(
    store: JobStore,
    celery: FakeCelery,
    redis_client: fakeredis.FakeRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = store.submit("echo", None, inputs(40)).job_id
    run_chunk(redis_client, FakeModel(), job, 0, 16)
    # A second worker that read the items before the first one recorded them.
    items = [(i, orjson.dumps({"x": i})) for i in range(16)]
    monkeypatch.setattr(worker_jobs, "_pending", lambda *_: items)
    assert run_chunk(redis_client, FakeModel(), job, 0, 16) == 16
    status = store.status(job)
    assert (status.done, status.failed, status.status) == (16, 0, "running")


def test_a_failing_batch_fails_its_items_only(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    items = [*inputs(4), b'"boom"', *inputs(3)]
    job = store.submit("echo", "2.0", items).job_id
    drain(redis_client, celery, FakeModel())
    status = store.status(job)
    assert (status.status, status.done, status.failed) == ("succeeded", 4, 4)
    assert store.results(job, 3, 2) == [
        {"index": 3, "status": 200, "result": {"x": 3}},
        {"index": 4, "status": 503, "error": "Prediction failed"},
    ]


def test_a_job_whose_every_item_fails_has_failed(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    job = store.submit("echo", None, [b'"boom"'] * 3).job_id
    drain(redis_client, celery, FakeModel())
    status = store.status(job)
    assert (status.status, status.done, status.failed) == ("failed", 0, 3)


def test_reply_shapes(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    bodies = {
        "0": InferenceReply(200, "", {}, None, b"plain text"),
        "1": InferenceReply(200, "", {}, None, b"\x89PNG\xff"),
        "2": InferenceReply(404, "Not Found", {}, None, b"no such thing"),
        "3": InferenceReply(500, "Oops", {}, None, b""),
        "4": InferenceReply(201, "", {}, "application/json", b"[1, 2]"),
    }
    job = store.submit("echo", None, inputs(5)).job_id
    drain(redis_client, celery, FakeModel(lambda r: bodies[r.request_id.split(":")[1]]))
    assert store.results(job, 0, 5) == [
        {"index": 0, "status": 200, "result": "plain text"},
        {"index": 1, "status": 200, "resultBase64": "iVBOR/8="},
        {"index": 2, "status": 404, "error": "no such thing"},
        {"index": 3, "status": 500, "error": "Oops"},
        {"index": 4, "status": 201, "result": [1, 2]},
    ]
    status = store.status(job)
    assert (status.done, status.failed) == (3, 2)


def test_an_unexpected_error_fails_the_batch_not_the_job(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    def broken(request: InferenceRequest) -> InferenceReply:
        raise RuntimeError("bug")

    job = store.submit("echo", None, inputs(2)).job_id
    drain(redis_client, celery, FakeModel(broken))
    assert store.status(job).status == "failed"
    assert store.results(job, 0, 1) == [
        {"index": 0, "status": 500, "error": "Internal Server Error"}
    ]


def test_a_job_that_cannot_be_queued_is_cancelled(
    redis_client: fakeredis.FakeRedis, celery: FakeCelery
) -> None:
    class Flaky(FakeCelery):
        def send_task(self, name: str, args: Any = None, **options: Any) -> None:
            if self.sent:
                raise ConnectionError("broker went away")
            super().send_task(name, args, **options)

    flaky = Flaky()
    store = make_store(redis_client, flaky)
    with pytest.raises(ServiceUnavailableException, match="broker went away"):
        store.submit("echo", None, inputs(40))
    [(_, (job, _, _), _)] = flaky.sent
    assert store.status(job).status == "cancelled"


def test_the_batch_task_runs_a_chunk(
    store: JobStore, celery: FakeCelery, redis_client: fakeredis.FakeRedis
) -> None:
    app = make_celery(Settings(redis_url="redis://127.0.0.1:1/0"))  # never connects here
    model = FakeModel()
    register_tasks(app, model, redis_client, "9000")
    task = app.tasks[BATCH_TASK]
    assert (task.acks_late, task.ignore_result) == (True, True)
    job = store.submit("echo", None, inputs(3)).job_id
    task(job, 0, 3)  # a direct call runs in this process
    assert store.status(job).status == "succeeded"
    assert len(model.batches) == 3
