"""Long-lived loops survive Redis errors: back-off, one log line per outage, no exit."""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from control.core import keys, observed
from control.core.observed import WorkerRecord, WorkerState
from control.core.settings import Settings
from workers import outage as outage_module
from workers.outage import Outage, until_available
from workers.supervisor import loop as supervisor_module
from workers.supervisor.loop import Supervisor
from workers.worker.heartbeat import Reporter

log = logging.getLogger("test.outage")


def test_an_outage_is_logged_once_and_backs_off_to_a_cap(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage("loop", log)
    with caplog.at_level(logging.INFO, "test.outage"):
        delays = [outage.failed(redis.ConnectionError("down")) for _ in range(8)]
        assert outage.ongoing and outage.recovered() and not outage.recovered()
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    levels = [r.levelname for r in caplog.records]
    assert levels == ["ERROR", "INFO"]  # one line when it starts, one when it ends


def test_until_available_retries_redis_errors_and_stops_on_request() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.BusyLoadingError("loading the AOF")
        return "ok"

    stop = threading.Event()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(outage_module, "Outage", functools.partial(Outage, first=0.001))
        assert until_available(flaky, stop, "start-up", log) == "ok"
    assert len(calls) == 3
    stop.set()
    assert until_available(flaky, stop, "start-up", log) is None
    assert len(calls) == 3  # not called once stopped


class FailingRedis(fakeredis.FakeRedis):
    """A fake Redis whose writes fail while ``down`` is set."""

    down = False

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise redis.ConnectionError("Redis is restarting")
        return super().pipeline(*args, **kwargs)


def record() -> WorkerRecord:
    return WorkerRecord("9000", "m", "1.0", "h", 1, -1, WorkerState.LOADING, 0.0)


def test_a_state_change_during_an_outage_is_published_by_a_later_beat() -> None:
    client = FailingRedis(server=fakeredis.FakeServer())
    reporter = Reporter(client, record())
    client.down = True
    reporter.set_state(WorkerState.READY)  # does not raise
    assert observed.read(client, "9000") is None
    client.down = False
    reporter.start()
    try:
        wait(lambda: (r := observed.read(client, "9000")) and r.state is WorkerState.READY)
    finally:
        reporter.stop()


def test_a_serving_worker_whose_loop_failed_reports_failed() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    reporter = Reporter(client, record())
    reason = {"text": ""}
    reporter.watch(lambda: reason["text"])
    reporter.set_state(WorkerState.READY)
    reporter.start()
    try:
        reason["text"] = "Online request loop died"
        wait(lambda: (r := observed.read(client, "9000")) and r.state is WorkerState.FAILED)
        published = observed.read(client, "9000")
        assert published is not None and published.reason == "Online request loop died"
        reason["text"] = ""  # FAILED stays: the supervisor replaces the worker
        assert reporter.record.state is WorkerState.FAILED
    finally:
        reporter.stop()


def wait(condition: Any, timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        done.wait(0.02)
    raise AssertionError("condition not met")


class FlakyPubSub:
    """The first ``failures`` subscriptions fail as a restarting Redis makes them fail."""

    def __init__(self, client: fakeredis.FakeRedis, failures: int) -> None:
        self._client = client
        self.failures = failures
        self.made = 0

    def __call__(self, **kwargs: Any) -> Any:
        self.made += 1
        pubsub = fakeredis.FakeRedis.pubsub(self._client, **kwargs)  # type: ignore[no-untyped-call]
        if self.made <= self.failures:
            pubsub.subscribe = _raise
        return pubsub


def _raise(*args: Any, **kwargs: Any) -> None:
    raise redis.ConnectionError("Connection refused")


def test_the_supervisor_survives_pubsub_and_tick_errors(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    settings = Settings(home=tmp_path / "home", model_store=tmp_path, redis_url="redis://x")
    supervisor = Supervisor(settings, client, "h1", lambda *args: None)  # type: ignore[arg-type]
    flaky = FlakyPubSub(client, failures=2)
    ticks = {"n": 0}
    real_tick = supervisor.tick

    def tick() -> Any:
        ticks["n"] += 1
        if ticks["n"] == 1:
            raise ValueError("a malformed record")  # not Redis: logged, the loop goes on
        if ticks["n"] == 2:
            raise redis.TimeoutError("Timeout reading from socket")
        return real_tick()

    stop = threading.Event()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client, "pubsub", flaky)
        mp.setattr(supervisor, "tick", tick)
        mp.setattr(supervisor_module, "Outage", functools.partial(Outage, first=0.01))
        runner = threading.Thread(target=supervisor.run, args=(stop,))
        runner.start()
        try:
            wait(lambda: client.exists(keys.host("h1")) and ticks["n"] >= 4)
        finally:
            stop.set()
            runner.join(10)
    assert not runner.is_alive()
    assert flaky.made >= 3  # re-created after each failure
