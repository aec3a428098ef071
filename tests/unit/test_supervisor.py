"""The supervisor applying ``plan`` to processes: over fakeredis, with fake worker
processes (``tests.support.fakes.FakeProcess``) and a fake clock, through the registry
writes the management API makes. GPU placement and usage, adoption and model files have
their own tests (test_gpu_*.py, test_adoption.py, test_model_files.py)."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import fakeredis
import pytest

from control.core import keys, observed
from control.core.envelope import Reply, Request
from control.core.observed import WorkerRecord, WorkerState
from control.core.registry import Registry
from control.core.settings import Settings
from tests.support.fakes import FakeProcess
from tests.support.handlers import make_spec
from workers.supervisor.loop import LEASE_SECONDS, Supervisor
from workers.supervisor.plan import (
    DRAIN_GRACE,
    Backoff,
    Fail,
    Forget,
    Kill,
    Recovered,
    Start,
    Stop,
)

START = 1_000_000.0


class Clock:
    """The supervisor's clock: moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Host:
    """Host ``h1``: its supervisor, the registry it reads, and the fake workers it runs."""

    def __init__(self, tmp_path: Path) -> None:
        server = fakeredis.FakeServer()
        self.client = fakeredis.FakeRedis(server=server, decode_responses=True)
        self.frames = fakeredis.FakeRedis(server=server)
        self.registry = Registry(self.client)
        self.clock = Clock()
        #: Every process spawned, in order, with its worker id.
        self.spawned: list[tuple[str, FakeProcess]] = []
        #: Raised by the next spawns, one each, before any process starts.
        self.spawn_errors: list[OSError] = []
        #: Spawn processes that ignore SIGTERM.
        self.stubborn = False
        self.supervisor = Supervisor(
            Settings(home=tmp_path / "home"),
            self.client,
            "h1",
            self.spawn,
            clock=self.clock,
            frames=self.frames,
        )

    def spawn(self, wid: str, model: str, version: str, slot: int, gpu: int) -> FakeProcess:
        if self.spawn_errors:
            raise self.spawn_errors.pop(0)
        process = FakeProcess(20_000 + len(self.spawned), ignores_sigterm=self.stubborn)
        self.spawned.append((wid, process))
        return process

    def register(self, name: str = "m", workers: int = 1) -> None:
        self.registry.register(make_spec("h.py", name=name), workers, workers)

    def process(self, wid: str) -> FakeProcess:
        """The latest process spawned for ``wid``."""
        return [p for w, p in self.spawned if w == wid][-1]

    def record(self, wid: str) -> WorkerRecord:
        found = observed.read(self.client, wid)
        assert found is not None, f"no record of worker {wid}"
        return found

    def report(self, wid: str, state: WorkerState) -> None:
        """What the worker's heartbeat writes."""
        now = self.clock()
        record = dataclasses.replace(self.record(wid), state=state, since=now, heartbeat=now)
        observed.publish(self.client, record)

    def lease(self, slot: int, name: str = "m") -> str | None:
        holder = self.client.get(keys.slot(name, "1.0", slot))
        return None if holder is None else str(holder)

    def wids(self, name: str = "m") -> list[str]:
        return sorted(r.wid for r in observed.workers_of(self.client, name, "1.0"))


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_it_starts_min_workers_with_leases_and_starting_records(host: Host) -> None:
    host.register(workers=2)
    assert host.supervisor.tick() == [Start("m", "1.0", 0, -1), Start("m", "1.0", 1, -1)]
    assert [p.pid for _, p in host.spawned] == [20_000, 20_001]
    for slot, (wid, process) in enumerate(host.spawned):
        record = host.record(wid)
        assert (record.state, record.pid, record.slot, record.host) == (
            WorkerState.STARTING,
            process.pid,
            slot,
            "h1",
        )
        assert host.lease(slot) == "h1"
        assert 0 < host.client.pttl(keys.slot("m", "1.0", slot)) <= LEASE_SECONDS * 1000
    assert host.client.hget(keys.host("h1"), "gpus") == "0"
    assert host.supervisor.tick() == []  # starting: within worker_spawn_timeout
    assert len(host.spawned) == 2


def test_a_worker_that_never_reports_is_killed_after_the_spawn_timeout(host: Host) -> None:
    host.register()
    host.supervisor.tick()
    [(wid, process)] = host.spawned
    host.clock.now += 120
    assert host.supervisor.tick() == []
    host.clock.now += 1
    assert host.supervisor.tick() == [Kill(wid, "Worker process did not start within 120 s")]
    assert process.signals == [signal.SIGKILL]
    [action] = host.supervisor.tick()
    assert isinstance(action, Fail) and action.backoff.reason.startswith("Worker process did")


def test_an_unasked_exit_fails_the_slot_and_restarts_only_after_the_back_off(host: Host) -> None:
    host.register()
    host.supervisor.tick()
    [(wid, first)] = host.spawned
    host.report(wid, WorkerState.READY)
    first.exit(3)
    assert host.supervisor.tick() == [
        Fail(wid, "m", "1.0", 0, Backoff(wid, 1, START + 1, START, 1, "Worker died (exit code 3)"))
    ]
    record = host.record(wid)
    assert (record.state, record.reason) == (WorkerState.FAILED, "Worker died (exit code 3)")
    assert host.lease(0) == "h1"  # the slot waits here for its retry

    host.clock.now = START + 0.9
    assert host.supervisor.tick() == []
    host.clock.now = START + 1
    assert host.supervisor.tick() == [Start("m", "1.0", 0, -1, wid)]
    assert len(host.spawned) == 2 and host.record(wid).state is WorkerState.STARTING

    # Fibonacci: the second failure in a row waits 1 s again, the third 2 s.
    host.process(wid).exit(1)
    [fail] = host.supervisor.tick()
    assert isinstance(fail, Fail) and (fail.backoff.failures, fail.backoff.retry_at) == (
        2,
        START + 2,
    )
    host.clock.now = START + 2
    host.supervisor.tick()
    host.process(wid).exit(1)
    [fail] = host.supervisor.tick()
    assert isinstance(fail, Fail) and (fail.backoff.failures, fail.backoff.retry_at) == (
        3,
        START + 4,
    )
    host.clock.now = START + 3.9
    assert host.supervisor.tick() == []
    host.clock.now = START + 4
    assert host.supervisor.tick() == [Start("m", "1.0", 0, -1, wid)]

    host.report(wid, WorkerState.READY)
    assert host.supervisor.tick() == [Recovered("m", "1.0", 0)]
    host.process(wid).exit(1)
    [fail] = host.supervisor.tick()  # a fresh failure: the history was cleared
    assert isinstance(fail, Fail) and fail.backoff.failures == 1


@pytest.mark.parametrize(
    ("exit_code", "status"),
    [(3, 500), (-signal.SIGSEGV, 500), (-signal.SIGKILL, 507)],
    ids=["exit code", "crash", "OOM killer"],
)
def test_a_dead_workers_requests_are_answered_worker_died(
    host: Host, exit_code: int, status: int
) -> None:
    host.register()
    host.supervisor.tick()
    [(wid, process)] = host.spawned
    host.report(wid, WorkerState.BUSY)
    request = Request(id="r1", model="m", version="1.0", deadline=0.0, enqueued=0.0, parts=())
    host.frames.lpush(keys.inflight(wid), request.frame())
    process.exit(exit_code)
    host.supervisor.tick()
    raw = host.frames.lpop(keys.reply("r1"))
    assert isinstance(raw, bytes)
    reply = Reply.parse(raw)
    assert (reply.status, reply.error) == (status, "Worker died.")
    assert host.frames.llen(keys.inflight(wid)) == 0


def test_a_dead_workers_requests_are_answered_on_their_reply_to(host: Host) -> None:
    host.register()
    host.supervisor.tick()
    [(wid, process)] = host.spawned
    host.report(wid, WorkerState.BUSY)
    listener = keys.replies("api-1")
    for rid, reply_to in (("r1", listener), ("r2", listener), ("r3", "")):
        request = Request(id=rid, model="m", version="", deadline=0.0, enqueued=0.0,
                          reply_to=reply_to)  # fmt: skip
        host.frames.lpush(keys.inflight(wid), request.frame())
    process.exit(3)
    host.supervisor.tick()
    shared = [Reply.parse(f) for f in host.frames.lrange(listener, 0, -1) if isinstance(f, bytes)]
    assert sorted((r.id, r.status, r.error) for r in shared) == [
        ("r1", 500, "Worker died."),
        ("r2", 500, "Worker died."),
    ]
    [own] = [
        Reply.parse(f) for f in host.frames.lrange(keys.reply("r3"), 0, -1) if isinstance(f, bytes)
    ]
    assert (own.id, own.error) == ("r3", "Worker died.")
    assert host.frames.llen(keys.inflight(wid)) == 0


def test_scale_down_drains_and_releases_the_slot(host: Host) -> None:
    host.register(workers=2)
    host.supervisor.tick()
    (kept, kept_process), (drained, drained_process) = host.spawned
    host.stubborn = True
    host.registry.scale("m", "1.0", 1, 1)
    assert host.supervisor.tick() == [Stop(drained)]
    assert drained_process.signals == [signal.SIGTERM]
    assert host.lease(1) is None  # given up as the drain starts
    assert host.supervisor.tick() == [Forget(drained, "m", "1.0", 1, release=False)]
    assert host.wids() == [kept] and kept_process.signals == []
    assert host.supervisor.tick() == [] and len(host.spawned) == 2


def test_a_drain_past_response_timeout_and_grace_is_killed(host: Host) -> None:
    host.stubborn = True  # a handler stuck in a call
    host.register(workers=2)
    host.supervisor.tick()
    (kept, _), (wid, process) = host.spawned
    host.report(kept, WorkerState.READY)
    host.report(wid, WorkerState.BUSY)
    host.registry.scale("m", "1.0", 1, 1)
    assert host.supervisor.tick() == [Stop(wid)]
    host.clock.now = START + 120 + DRAIN_GRACE
    assert host.supervisor.tick() == []
    host.clock.now += 0.1
    assert host.supervisor.tick() == [Kill(wid, "")]
    assert process.signals == [signal.SIGTERM, signal.SIGKILL]
    [forget] = host.supervisor.tick()
    assert isinstance(forget, Forget) and forget.wid == wid  # asked to stop: no failure
    assert observed.read(host.client, wid) is None


def test_unregister_drains_every_worker_and_leaves_nothing(host: Host) -> None:
    host.register(workers=2)
    host.supervisor.tick()
    wids = [wid for wid, _ in host.spawned]
    host.registry.prepare_unregister("m", "1.0")
    assert host.supervisor.tick() == [Stop(wid) for wid in wids]
    assert [p.signals for _, p in host.spawned] == [[signal.SIGTERM]] * 2
    assert host.supervisor.tick() == [
        Forget(wid, "m", "1.0", slot, release=False) for slot, wid in enumerate(wids)
    ]
    host.registry.delete("m", "1.0")
    assert host.supervisor.tick() == []
    assert host.wids() == [] and [host.lease(0), host.lease(1)] == [None, None]
    assert len(host.spawned) == 2


def test_a_lease_another_host_took_drains_the_worker_and_stays_theirs(host: Host) -> None:
    host.register()
    host.supervisor.tick()
    [(wid, process)] = host.spawned
    host.report(wid, WorkerState.READY)
    host.client.set(keys.slot("m", "1.0", 0), "h2")  # h1 was cut off; h2 restarted it
    assert host.supervisor.tick() == [Stop(wid)]
    assert process.signals == [signal.SIGTERM]
    assert host.supervisor.tick() == [Forget(wid, "m", "1.0", 0, release=False)]
    assert host.supervisor.tick() == []
    assert host.lease(0) == "h2" and len(host.spawned) == 1


def test_a_lease_that_expired_under_a_worker_is_claimed_again_not_restarted(
    host: Host,
) -> None:
    host.register()
    host.supervisor.tick()
    [(wid, process)] = host.spawned
    host.report(wid, WorkerState.READY)
    host.client.delete(keys.slot("m", "1.0", 0))  # a Redis outage longer than a lease
    assert host.supervisor.tick() == []
    assert host.lease(0) == "h1" and len(host.spawned) == 1 and process.signals == []


def test_a_worker_whose_record_expired_is_killed_as_hung(host: Host) -> None:
    host.register()
    host.supervisor.tick()
    [(wid, process)] = host.spawned
    host.report(wid, WorkerState.READY)
    assert host.supervisor.tick() == []  # it has seen the worker report
    host.client.delete(keys.worker(wid))  # three heartbeats missed
    assert host.supervisor.tick() == [Kill(wid, "Worker stopped sending heartbeats")]
    assert process.signals == [signal.SIGKILL]


def test_a_spawn_error_backs_off_then_retries(host: Host) -> None:
    host.register()
    host.spawn_errors = [OSError("fork failed"), OSError("fork failed again")]
    [start] = host.supervisor.tick()
    assert start == Start("m", "1.0", 0, -1) and host.spawned == []
    [wid] = host.wids()
    assert host.record(wid).state is WorkerState.STARTING and host.lease(0) == "h1"

    reason = "spawn failed: fork failed"
    assert host.supervisor.tick() == [
        Fail(wid, "m", "1.0", 0, Backoff(wid, 1, START + 1, START, 1, reason))
    ]
    record = host.record(wid)
    assert (record.state, record.reason) == (WorkerState.FAILED, reason)
    assert host.supervisor.tick() == []  # within the back-off: no retry
    host.clock.now = START + 1
    assert host.supervisor.tick() == [Start("m", "1.0", 0, -1, wid)]
    [fail] = host.supervisor.tick()
    assert isinstance(fail, Fail) and fail.backoff == Backoff(
        wid, 2, START + 2, START, 1, "spawn failed: fork failed again"
    )
    host.clock.now = START + 2
    assert host.supervisor.tick() == [Start("m", "1.0", 0, -1, wid)]
    assert [w for w, _ in host.spawned] == [wid] and host.lease(0) == "h1"
    host.report(wid, WorkerState.READY)
    assert host.supervisor.tick() == [Recovered("m", "1.0", 0)]


def test_shutdown_drains_kills_past_the_timeout_and_gives_everything_up(host: Host) -> None:
    host.register(workers=1)
    host.supervisor.tick()
    host.stubborn = True
    host.registry.scale("m", "1.0", 2, 2)
    host.supervisor.tick()
    (_, polite), (_, stuck) = host.spawned
    host.register("n")
    host.spawn_errors = [OSError("no memory")]
    host.supervisor.tick()  # n's spawn fails
    host.supervisor.tick()  # ... and its slot is in back-off
    assert host.lease(0, "n") == "h1" and len(host.wids("n")) == 1

    host.supervisor.shutdown(timeout=0.5)
    assert polite.signals == [signal.SIGTERM]
    assert stuck.signals == [signal.SIGTERM, signal.SIGKILL]
    first_wait = stuck.waits[0]
    assert first_wait is not None and 0 < first_wait <= 0.5  # what was left of the timeout
    assert host.wids("m") == [] and host.wids("n") == []
    assert [host.lease(0), host.lease(1), host.lease(0, "n")] == [None, None, None]
    assert not host.client.exists(keys.host("h1"))


def test_shutdown_gives_up_a_slot_whose_spawn_just_failed(host: Host) -> None:
    host.register()
    host.spawn_errors = [OSError("fork failed")]
    host.supervisor.tick()
    host.supervisor.shutdown(timeout=0.5)
    assert host.wids() == [] and host.lease(0) is None
    assert not host.client.exists(keys.host("h1"))
