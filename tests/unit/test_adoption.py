"""Workers outlive their supervisor: adoption by a successor, and the lease rule that
makes an orphan drain itself (``workers.supervisor.spawn.adopt_leftovers``,
``workers.worker.heartbeat``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from control.core import keys, observed
from control.core.envelope import Reply, Request
from control.core.observed import WorkerRecord, WorkerState
from control.core.registry import Registry
from control.core.settings import Settings
from control.core.spec import ModelSpec
from workers.model_files import ModelFiles
from workers.supervisor import spawn as launch
from workers.supervisor.loop import Supervisor
from workers.supervisor.plan import EXIT_UNKNOWN, Fail, Forget
from workers.supervisor.spawn import Leftover, adopt_leftovers
from workers.worker.heartbeat import LeaseWatch, Reporter

# -- the lease rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reads", "verdicts"),
    [
        # (seconds, holder) read by successive beats -> must the worker drain?
        ([(0, "h1"), (5, "h1"), (60, "h1")], [False, False, False]),
        # Taken by another host: a replacement runs there, drain at once.
        ([(0, "h1"), (1, "h2")], [False, True]),
        # Absent: the grace (30 s) counts from the first beat that saw it absent.
        ([(0, None), (29, None), (31, None)], [False, False, True]),
        # Re-claimed within the grace (a Redis outage, a restarted supervisor): reset.
        ([(0, None), (20, "h1"), (40, None), (69, None), (71, None)],
         [False, False, False, False, True]),
    ],
)  # fmt: skip
def test_a_worker_drains_when_its_lease_is_elsewhere_or_long_gone(
    reads: list[tuple[float, str | None]], verdicts: list[bool]
) -> None:
    watch = LeaseWatch(keys.slot("m", "1.0", 0), "h1", grace=30.0)
    assert [bool(watch.judge(holder, at)) for at, holder in reads] == verdicts


def test_the_reasons_say_why() -> None:
    watch = LeaseWatch("k", "h1", grace=30.0)
    assert watch.judge("h2", 0) == "its slot was taken over by host h2"
    watch.judge(None, 0)
    assert "gone for over 30 s" in watch.judge(None, 31)


def wait(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def record(state: WorkerState = WorkerState.READY, pid: int = 1, slot: int = 0) -> WorkerRecord:
    now = time.time()
    return WorkerRecord("9000", "m", "1.0", "h1", pid, -1, state, now, since=now, slot=slot)


def test_a_worker_whose_slot_went_elsewhere_publishes_draining_and_drains_once() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    client.set(keys.slot("m", "1.0", 0), "h2")  # this host was cut off; h2 took the slot
    reporter = Reporter(client, record())
    lost: list[str] = []
    reporter.guard(LeaseWatch(keys.slot("m", "1.0", 0), "h1"), lost.append)
    reporter.start()
    try:
        wait(lambda: lost)
        wait(lambda: (r := observed.read(client, "9000")) and r.state is WorkerState.DRAINING)
        reporter.set_state(WorkerState.READY)  # e.g. Celery's worker_ready, later
        current = observed.read(client, "9000")
        assert current is not None and current.state is WorkerState.DRAINING
        assert current.reason == "its slot was taken over by host h2"
    finally:
        reporter.stop()
    assert lost == ["its slot was taken over by host h2"]


def test_a_worker_holding_its_lease_goes_on_serving() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    client.set(keys.slot("m", "1.0", 0), "h1")
    reporter = Reporter(client, record())
    lost: list[str] = []
    reporter.guard(LeaseWatch(keys.slot("m", "1.0", 0), "h1"), lost.append)
    reporter.set_state(WorkerState.READY)
    reporter.start()
    try:
        first = observed.read(client, "9000")
        assert first is not None
        wait(lambda: (r := observed.read(client, "9000")) and r.heartbeat > first.heartbeat)
    finally:
        reporter.stop()
    current = observed.read(client, "9000")
    assert lost == [] and current is not None and current.state is WorkerState.READY


# -- adoption ----------------------------------------------------------------------------


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)


#: Above Linux's largest pid_max (2**22): no process has it.
NO_SUCH_PID = 2**22 + 1


def live_pid() -> int:
    """A live process that is neither this one nor its parent, created long ago: init.
    Only identity checks run on it here (the test replaces ``_stop``)."""
    return 1


def test_a_live_worker_with_its_lease_is_adopted(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    observed.publish(client, record(pid=live_pid()))
    client.set(keys.slot("m", "1.0", 0), "h1", px=3000)
    files = ModelFiles.of(tmp_path, "h1")
    [left] = adopt_leftovers(client, "h1", files)
    assert left.process is not None
    assert (left.record.wid, left.record.slot, left.process.pid) == ("9000", 0, 1)
    assert left.process.poll() is None


def test_a_free_lease_is_claimed_again_and_a_taken_one_stops_the_worker(
    client: fakeredis.FakeRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped: list[int] = []
    monkeypatch.setattr(launch, "_stop", lambda proc, timeout: stopped.append(proc.pid))
    observed.publish(client, record(pid=live_pid()))  # lease expired: free
    assert len(adopt_leftovers(client, "h1", ModelFiles.of(tmp_path, "h1"))) == 1
    assert client.get(keys.slot("m", "1.0", 0)) == "h1"
    assert 0 < client.pttl(keys.slot("m", "1.0", 0)) <= observed.LEASE_SECONDS * 1000

    client.set(keys.slot("m", "1.0", 0), "h2")  # another host runs the slot now
    assert adopt_leftovers(client, "h1", ModelFiles.of(tmp_path, "h1")) == []
    assert stopped == [1]
    assert observed.read(client, "9000") is None
    assert client.get(keys.slot("m", "1.0", 0)) == "h2"


def test_dead_or_impostor_workers_are_forgotten_with_this_hosts_other_leases(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    observed.publish(client, record(pid=NO_SUCH_PID))  # exited
    impostor = WorkerRecord("9001", "m", "1.0", "h1", 1, -1, WorkerState.READY, 0.0, slot=1)
    observed.publish(client, impostor)  # pid 1 started long after "its" record: not it
    observed.publish(client, WorkerRecord("9002", "m", "1.0", "h1", os.getpid(), -1,
                                          WorkerState.READY, time.time(), slot=2))  # fmt: skip
    client.set(keys.slot("m", "1.0", 0), "h1")
    client.set(keys.slot("m", "1.0", 5), "h2")
    found = adopt_leftovers(client, "h1", ModelFiles.of(tmp_path, "h1"))
    # Found dead (to be answered for), none adopted: the impostor and this very process
    # are not the workers their records name.
    assert sorted((f.record.wid, f.process) for f in found) == [
        ("9000", None), ("9001", None), ("9002", None)
    ]  # fmt: skip
    assert [observed.read(client, w) for w in ("9000", "9001", "9002")] == [None] * 3
    assert client.get(keys.slot("m", "1.0", 0)) is None
    assert client.get(keys.slot("m", "1.0", 5)) == "h2"  # another host's: untouched


class Exited:
    """An adopted worker's process, already gone (no exit status: not our child)."""

    def __init__(self) -> None:
        self.pid = 4242

    def poll(self) -> int:
        return EXIT_UNKNOWN

    def send_signal(self, sig: int) -> None:
        raise AssertionError("no signal to a process that is gone")

    def wait(self, timeout: float | None = None) -> int:
        return EXIT_UNKNOWN


def test_the_supervisor_owns_adopted_workers_and_reaps_them(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    spawned: list[str] = []
    supervisor = Supervisor(
        Settings(home=tmp_path),
        client,
        "h1",
        lambda wid, *_: spawned.append(wid),  # type: ignore[arg-type]
    )
    serving, draining = (
        record(),
        WorkerRecord("9001", "m", "1.0", "h1", 1, -1, WorkerState.DRAINING, 0.0, slot=1),
    )
    supervisor.adopt([Leftover(serving, Exited()), Leftover(draining, Exited())])  # type: ignore[arg-type]
    snapshot = supervisor.observe([])
    assert {p.wid: p.exit_code for p in snapshot.processes} == {
        "9000": EXIT_UNKNOWN,
        "9001": EXIT_UNKNOWN,
    }
    actions = supervisor.tick()
    # No registration: both are forgotten; the draining one was asked (no failure).
    assert {type(a) for a in actions if isinstance(a, Forget | Fail)} == {Forget}
    assert spawned == []


# -- the supervisor keeps its leases -------------------------------------------------------


class Running:
    """A worker process that runs until signalled (then it has exited)."""

    def __init__(self) -> None:
        self.pid = 5000
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return None

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_an_expired_lease_is_claimed_again_and_a_taken_one_drains_the_worker(
    client: fakeredis.FakeRedis, tmp_path: Path
) -> None:
    registry = Registry(client)
    registry.register(
        ModelSpec(
            model_name="m", version="1.0", url="m.mar", archive="m.mar", downloaded=False,
            handler="h.py",
        ),
        1,
        1,
    )  # fmt: skip
    procs: list[Running] = []

    def spawn(*_: Any) -> Running:
        procs.append(Running())
        return procs[-1]

    supervisor = Supervisor(Settings(home=tmp_path), client, "h1", spawn)  # type: ignore[arg-type]
    supervisor.tick()
    lease = keys.slot("m", "1.0", 0)
    assert len(procs) == 1 and client.get(lease) == "h1"
    client.delete(lease)  # expired during a Redis outage longer than a lease
    supervisor.tick()
    assert client.get(lease) == "h1" and procs[0].signals == []
    client.set(lease, "h2")  # another host runs the slot now
    supervisor.tick()
    assert procs[0].signals == [signal.SIGTERM]
    assert client.get(lease) == "h2"


def test_a_worker_found_dead_at_adoption_has_its_requests_answered(tmp_path: Path) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    frames = fakeredis.FakeRedis(server=server)
    request = Request(id="r1", model="m", version="1.0", deadline=0.0, enqueued=0.0, parts=())
    frames.lpush(keys.inflight("9000"), request.frame())
    spawn: Any = None  # nothing is started
    supervisor = Supervisor(Settings(home=tmp_path), client, "h1", spawn, frames=frames)
    supervisor.adopt([Leftover(record(), None)])
    reply = Reply.parse(frames.lpop(keys.reply("r1")))  # type: ignore[arg-type]
    assert (reply.status, reply.error) == (500, "Worker died.")
    assert frames.llen(keys.inflight("9000")) == 0
    assert supervisor.observe([]).processes == ()


@pytest.mark.parametrize(
    ("holder", "state", "written"),
    [
        ("h1", WorkerState.READY, WorkerState.READY),
        (None, WorkerState.BUSY, WorkerState.BUSY),
        ("h2", WorkerState.READY, WorkerState.DRAINING),
        ("h2", WorkerState.BUSY, WorkerState.DRAINING),
        ("h2", WorkerState.LOADING, WorkerState.LOADING),
    ],
)
def test_a_guarded_publish_never_shows_serving_when_the_slot_is_elsewhere(
    client: fakeredis.FakeRedis, holder: str | None, state: WorkerState, written: WorkerState
) -> None:
    lease = keys.slot("m", "1.0", 0)
    if holder is not None:
        client.set(lease, holder)
    observed.publish(client, record(state), lease=lease)
    current = observed.read(client, "9000")
    assert current is not None and current.state is written
    assert current.slot == 0 and 0 < client.pttl(keys.worker("9000")) <= 3000
    assert client.smembers(keys.workers("m", "1.0")) == {"9000"}
