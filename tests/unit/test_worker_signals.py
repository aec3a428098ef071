"""A worker's Celery signal handlers: draining never blocks the signal handler."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import fakeredis
import pytest
from celery import signals

from control.core.observed import WorkerRecord, WorkerState
from workers.worker.heartbeat import Reporter
from workers.worker.process import _wire_signals
from workers.worker.serving import ModelRunner, OnlineLoop


class BlockingBatcher:
    """A batcher whose wait for requests lasts until ``release`` is set."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.release = threading.Event()

    window = 0.0
    size = 1

    def prefetch(self, pipe: object) -> None:
        raise AssertionError("it hands out no batch to reply to")

    def next_batch(self, wait: float, taken: object = ()) -> list[bytes]:
        self.waiting.set()
        self.release.wait(10)
        return []


@pytest.fixture
def wired() -> Iterator[tuple[OnlineLoop, BlockingBatcher, Reporter]]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    record = WorkerRecord("9000", "m", "1.0", "h", 1, -1, WorkerState.LOADING, 0.0)
    reporter = Reporter(client, record)
    batcher = BlockingBatcher()
    online = OnlineLoop(client, ModelRunner(object()), batcher, "inflight")  # type: ignore[arg-type]
    receivers = (list(signals.worker_ready.receivers), list(signals.worker_shutting_down.receivers))
    _wire_signals(reporter, online)
    try:
        yield online, batcher, reporter
    finally:
        batcher.release.set()
        online.stop(5)
        signals.worker_ready.receivers[:] = receivers[0]
        signals.worker_shutting_down.receivers[:] = receivers[1]


def test_draining_twice_returns_at_once_while_a_wait_is_in_progress(
    wired: tuple[OnlineLoop, BlockingBatcher, Reporter],
) -> None:
    online, batcher, reporter = wired
    signals.worker_ready.send(sender=None)
    assert batcher.waiting.wait(5)
    assert reporter.record.state is WorkerState.READY
    returned = threading.Event()

    def two_sigterms() -> None:  # what Celery's SIGTERM handler does, twice
        signals.worker_shutting_down.send(sender=None, sig="SIGTERM", how="Warm", exitcode=0)
        signals.worker_shutting_down.send(sender=None, sig="SIGTERM", how="Warm", exitcode=0)
        returned.set()

    threading.Thread(target=two_sigterms, daemon=True).start()
    # The online loop is still inside its wait: a handler that joined it would not return.
    assert returned.wait(5), "the draining handler blocked"
    assert reporter.record.state is WorkerState.DRAINING
    assert not online.request_stop()  # already requested, once
    batcher.release.set()
    online.stop(5)  # what _serve does after Celery stopped: the loop ends
