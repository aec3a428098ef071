"""Table-driven tests of the pure reconcile decision, one row per rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control.core.observed import WorkerState
from workers.supervisor.plan import (
    Action,
    Backoff,
    Fail,
    Forget,
    Kill,
    Observed,
    Process,
    Recovered,
    Release,
    Start,
    Stop,
    Target,
    plan,
)

NOW = 1000.0
HOST = "a"
T = Target(
    "m",
    "1.0",
    min_workers=2,
    max_workers=2,
    generation=3,
    startup_timeout=30,
    response_timeout=60,
    max_retry_timeout=300,
)


def proc(slot: int, **kw: object) -> Process:
    base = Process(
        wid=f"90{slot:02d}",
        model="m",
        version="1.0",
        slot=slot,
        gpu=-1,
        spawned_at=NOW - 5,
        state=WorkerState.READY,
        state_since=NOW - 5,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def held(*slots: int, host: str = HOST) -> dict[tuple[str, str], dict[int, str]]:
    return {("m", "1.0"): dict.fromkeys(slots, host)}


def obs(processes: tuple[Process, ...] = (), slots: object = None, **kw: object) -> Observed:
    base = Observed(host=HOST, now=NOW, processes=processes, slots=slots or {})  # type: ignore[arg-type]
    return replace(base, **kw)  # type: ignore[arg-type]


def backoff(
    failures: int = 1, retry_at: float = NOW + 1, since: float = NOW - 1, generation: int = 3
) -> Backoff:
    return Backoff("9000", failures, retry_at, since, generation, "boom")


CASES: list[tuple[str, list[Target], Observed, list[Action]]] = [
    ("nothing desired, nothing running", [], obs(), []),
    (
        "a slot another host took (this one was cut off) drains its worker here",
        [T],
        obs((proc(0), proc(1, record_lost=True)), {("m", "1.0"): {0: HOST, 1: "b"}}),
        [Stop("9001")],
    ),
    (
        "a worker whose slot moved and that drained itself is no failure",
        [T],
        obs((proc(0), proc(1, exit_code=0)), {("m", "1.0"): {0: HOST, 1: "b"}}),
        [Forget("9001", "m", "1.0", 1, release=False)],
    ),
    (
        "a slot in back-off that another host took is forgotten here",
        [T],
        obs(
            (proc(0),),
            {("m", "1.0"): {0: HOST, 1: "b"}},
            backoff={("m", "1.0", 1): backoff()},
        ),
        [Release("m", "1.0", 1)],
    ),
    (
        "start up to min_workers on free slots",
        [T],
        obs(),
        [Start("m", "1.0", 0, -1), Start("m", "1.0", 1, -1)],
    ),
    ("steady state: nothing to do", [T], obs((proc(0), proc(1)), held(0, 1)), []),
    (
        "a loading worker counts: no double spawn",
        [T],
        obs((proc(0, state=WorkerState.LOADING), proc(1, state=WorkerState.STARTING)), held(0, 1)),
        [],
    ),
    (
        "scale down drains slots at or above max_workers",
        [replace(T, min_workers=1, max_workers=1)],
        obs((proc(0), proc(1)), held(0, 1)),
        [Stop("9001")],
    ),
    (
        "workers between min and max are left alone",
        [replace(T, min_workers=1, max_workers=3)],
        obs((proc(0), proc(1)), held(0, 1)),
        [],
    ),
    (
        "unregistered: drain everything",
        [],
        obs((proc(0), proc(1)), held(0, 1)),
        [Stop("9000"), Stop("9001")],
    ),
    (
        "drained worker exited: forget and release",
        [replace(T, min_workers=1, max_workers=1)],
        obs((proc(0), proc(1, stop_sent_at=NOW - 1, exit_code=0)), held(0)),
        [Forget("9001", "m", "1.0", 1, release=False)],
    ),
    (
        "a worker that died on its own after its model went away releases its slot",
        [],
        obs((proc(0, exit_code=0),), held(0)),
        [Forget("9000", "m", "1.0", 0, release=True)],
    ),
    (
        "a draining worker gave its slot up: a replacement starts beside it",
        [T],
        obs((proc(0), proc(1, stop_sent_at=NOW - 1)), held(0)),
        [Start("m", "1.0", 1, -1)],
    ),
    (
        "drain past response_timeout + grace is killed",
        [replace(T, min_workers=1, max_workers=1)],
        obs((proc(0), proc(1, stop_sent_at=NOW - 71)), held(0)),
        [Kill("9001", "")],
    ),
    (
        "still draining within grace",
        [replace(T, min_workers=1, max_workers=1)],
        obs((proc(0), proc(1, stop_sent_at=NOW - 69)), held(0)),
        [],
    ),
    (
        "crash: fail with back-off 1 s, keep the slot",
        [T],
        obs((proc(0), proc(1, exit_code=3)), held(0, 1)),
        [
            Fail(
                "9001",
                "m",
                "1.0",
                1,
                Backoff("9001", 1, NOW + 1, NOW, 3, "Worker died (exit code 3)"),
            )
        ],
    ),
    (
        "a SIGKILL nobody sent is the OOM killer: its requests are answered 507",
        [T],
        obs((proc(0), proc(1, exit_code=-9)), held(0, 1)),
        [
            Fail(
                "9001",
                "m",
                "1.0",
                1,
                Backoff("9001", 1, NOW + 1, NOW, 3, "Worker died (signal 9)"),
                answer=507,
            )
        ],
    ),
    (
        "a drained worker the OOM killer ended: forgotten, its requests answered 507",
        [T],
        obs((proc(0), proc(1, exit_code=-9, stop_sent_at=NOW - 1)), held(0)),
        [Forget("9001", "m", "1.0", 1, release=False, answer=507), Start("m", "1.0", 1, -1)],
    ),
    (
        "repeated crash: Fibonacci back-off",
        [T],
        obs(
            (proc(0), proc(1, exit_code=3, reason="ImportError: x")),
            held(0, 1),
            backoff={("m", "1.0", 1): backoff(failures=4, since=NOW - 20)},
        ),
        [Fail("9001", "m", "1.0", 1, Backoff("9001", 5, NOW + 5, NOW - 20, 3, "ImportError: x"))],
    ),
    (
        "load slower than startup_timeout is killed",
        [T],
        obs((proc(0), proc(1, state=WorkerState.LOADING, state_since=NOW - 31)), held(0, 1)),
        [Kill("9001", "Model load exceeded startup_timeout of 30 s")],
    ),
    (
        "request longer than response_timeout is killed",
        [T],
        obs((proc(0), proc(1, state=WorkerState.BUSY, state_since=NOW - 61)), held(0, 1)),
        [Kill("9001", "Worker did not respond within response_timeout of 60 s")],
    ),
    (
        "process that never reports is killed",
        [T],
        obs((proc(0), proc(1, state=WorkerState.STARTING, spawned_at=NOW - 121)), held(0, 1)),
        [Kill("9001", "Worker process did not start within 120 s")],
    ),
    (
        "lost heartbeat is killed",
        [T],
        obs((proc(0), proc(1, record_lost=True)), held(0, 1)),
        [Kill("9001", "Worker stopped sending heartbeats")],
    ),
    (
        "a lost record is excused within RECORD_TTL of a Redis outage's end",
        [T],
        obs((proc(0), proc(1, record_lost=True)), held(0, 1), outage_ended=NOW - 2.9),
        [],
    ),
    (
        "a lost record past RECORD_TTL after the outage is a hung worker",
        [T],
        obs((proc(0), proc(1, record_lost=True)), held(0, 1), outage_ended=NOW - 3),
        [Kill("9001", "Worker stopped sending heartbeats")],
    ),
    (
        "a lost record is judged as READY: no start or load timeout applies",
        [T],
        obs(
            (
                proc(0),
                proc(1, record_lost=True, state=WorkerState.STARTING, spawned_at=NOW - 900),
            ),
            held(0, 1),
            outage_ended=NOW - 1,
        ),
        [],
    ),
    (
        "a lost record of a worker that recovered counts as serving",
        [T],
        obs(
            (proc(0), proc(1, record_lost=True)),
            held(0, 1),
            backoff={("m", "1.0", 1): backoff()},
            outage_ended=NOW - 1,
        ),
        [Recovered("m", "1.0", 1)],
    ),
    (
        "spawn failed: back-off 1 s, like a crash",
        [T],
        obs((proc(0), proc(1, spawn_failed=True, reason="spawn failed: ENOMEM")), held(0, 1)),
        [Fail("9001", "m", "1.0", 1, Backoff("9001", 1, NOW + 1, NOW, 3, "spawn failed: ENOMEM"))],
    ),
    (
        "spawn failed again: Fibonacci back-off",
        [T],
        obs(
            (proc(0), proc(1, spawn_failed=True, reason="spawn failed: x")),
            held(0, 1),
            backoff={("m", "1.0", 1): backoff(failures=2, since=NOW - 3)},
        ),
        [Fail("9001", "m", "1.0", 1, Backoff("9001", 3, NOW + 2, NOW - 3, 3, "spawn failed: x"))],
    ),
    (
        "spawn failed for a model that went away: release the slot",
        [],
        obs((proc(0, spawn_failed=True, reason="spawn failed: x"),), held(0)),
        [Forget("9000", "m", "1.0", 0, release=True)],
    ),
    (
        "spawn failed and another host took the slot: nothing of it stays here",
        [T],
        obs(
            (proc(0), proc(1, spawn_failed=True, reason="spawn failed: x")),
            {("m", "1.0"): {0: HOST, 1: "b"}},
        ),
        [Forget("9001", "m", "1.0", 1, release=False)],
    ),
    (
        "a failed spawn holds no GPU",
        [replace(T, min_workers=3, max_workers=3)],
        obs(
            (replace(proc(0), gpu=0), proc(1, gpu=1, spawn_failed=True, reason="x")),
            held(0, 1),
            gpus=(0, 1),
        ),
        [
            Fail("9001", "m", "1.0", 1, Backoff("9001", 1, NOW + 1, NOW, 3, "x")),
            Start("m", "1.0", 2, 1),
        ],
    ),
    (
        "a lease that expired under a running worker stays this host's: no second worker",
        [T],
        obs((proc(0), proc(1)), held(0)),
        [],
    ),
    (
        "a lease that expired under a back-off: the back-off still holds",
        [T],
        obs((proc(0),), held(0), backoff={("m", "1.0", 1): backoff()}),
        [],
    ),
    (
        "a lease that expired under an elapsed back-off: retry with the same id",
        [T],
        obs((proc(0),), held(0), backoff={("m", "1.0", 1): backoff(retry_at=NOW)}),
        [Start("m", "1.0", 1, -1, "9000")],
    ),
    (
        "a back-off of a deleted model whose lease expired is forgotten",
        [],
        obs(backoff={("m", "1.0", 0): backoff()}),
        [Release("m", "1.0", 0)],
    ),
    (
        "a running worker reporting FAILED is killed with its reason after the grace",
        [T],
        obs(
            (
                proc(0),
                proc(1, state=WorkerState.FAILED, state_since=NOW - 6, reason="loop died"),
            ),
            held(0, 1),
        ),
        [Kill("9001", "loop died")],
    ),
    (
        "a worker that just reported FAILED gets the grace to exit by itself",
        [T],
        obs(
            (proc(0), proc(1, state=WorkerState.FAILED, state_since=NOW - 1, reason="bad")),
            held(0, 1),
        ),
        [],
    ),
    (
        "its kill counts as a failure of the slot, with the reported reason",
        [T],
        obs(
            (proc(0), proc(1, exit_code=-9, kill_reason="loop died", state=WorkerState.FAILED)),
            held(0, 1),
        ),
        [Fail("9001", "m", "1.0", 1, Backoff("9001", 1, NOW + 1, NOW, 3, "loop died"))],
    ),
    (
        "killed worker's exit records the kill reason",
        [T],
        obs((proc(0), proc(1, exit_code=-9, kill_reason="slow")), held(0, 1)),
        [Fail("9001", "m", "1.0", 1, Backoff("9001", 1, NOW + 1, NOW, 3, "slow"))],
    ),
    (
        "back-off not elapsed: wait",
        [T],
        obs((proc(0),), held(0, 1), backoff={("m", "1.0", 1): backoff()}),
        [],
    ),
    (
        "back-off elapsed: restart with the same id",
        [T],
        obs((proc(0),), held(0, 1), backoff={("m", "1.0", 1): backoff(retry_at=NOW)}),
        [Start("m", "1.0", 1, -1, "9000")],
    ),
    (
        "past max_retry_timeout: give up, stay failed",
        [T],
        obs(
            (proc(0),),
            held(0, 1),
            backoff={("m", "1.0", 1): backoff(retry_at=NOW, since=NOW - 300)},
        ),
        [],
    ),
    (
        "a new scale request retries a given-up slot",
        [replace(T, generation=4)],
        obs((proc(0),), held(0, 1), backoff={("m", "1.0", 1): backoff(since=NOW - 900)}),
        [Start("m", "1.0", 1, -1, "9000")],
    ),
    (
        "loaded after failures: recovered",
        [T],
        obs((proc(0), proc(1)), held(0, 1), backoff={("m", "1.0", 1): backoff()}),
        [Recovered("m", "1.0", 1)],
    ),
    (
        "idle held slot above max is released",
        [replace(T, min_workers=1, max_workers=1)],
        obs((proc(0),), held(0, 1), backoff={("m", "1.0", 1): backoff()}),
        [Release("m", "1.0", 1)],
    ),
    (
        "held slots of a deleted model are released",
        [],
        obs((), held(0), backoff={("m", "1.0", 0): backoff()}),
        [Release("m", "1.0", 0)],
    ),
    (
        "held slot without process (lost spawn) restarts",
        [T],
        obs((proc(0),), held(0, 1)),
        [Start("m", "1.0", 1, -1)],
    ),
    (
        "two hosts: claim only the fair share",
        [replace(T, min_workers=3, max_workers=3)],
        obs(live_hosts=2),
        [Start("m", "1.0", 0, -1), Start("m", "1.0", 1, -1)],
    ),
    (
        "two hosts: take what the other left",
        [replace(T, min_workers=3, max_workers=3)],
        obs(slots={("m", "1.0"): {0: "b", 1: "b"}}, live_hosts=2),
        [Start("m", "1.0", 2, -1)],
    ),
    (
        "other host holds everything: nothing to do",
        [T],
        obs(slots={("m", "1.0"): {0: "b", 1: "b"}}, live_hosts=2),
        [],
    ),
    (
        "GPUs assigned round-robin",
        [replace(T, min_workers=3, max_workers=3)],
        obs(gpus=(0, 1)),
        [Start("m", "1.0", 0, 0), Start("m", "1.0", 1, 1), Start("m", "1.0", 2, 0)],
    ),
    (
        "GPUs: least loaded first",
        [T],
        obs((replace(proc(0), gpu=0),), held(0), gpus=(0, 1)),
        [Start("m", "1.0", 1, 1)],
    ),
    (
        "deviceIds restrict the GPUs",
        [replace(T, device_ids=(1,))],
        obs(gpus=(0, 1)),
        [Start("m", "1.0", 0, 1), Start("m", "1.0", 1, 1)],
    ),
    (
        "deviceType cpu never gets a GPU",
        [replace(T, device_type="cpu")],
        obs(gpus=(0, 1)),
        [Start("m", "1.0", 0, -1), Start("m", "1.0", 1, -1)],
    ),
]


@pytest.mark.parametrize(
    ("desired", "observed", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(desired: list[Target], observed: Observed, expected: list[Action]) -> None:
    assert plan(desired, observed) == expected


def test_every_action_type_is_exercised() -> None:
    produced = {type(a) for _, d, o, _e in CASES for a in plan(d, o)}
    assert produced == {Start, Stop, Kill, Forget, Fail, Release, Recovered}


def test_plan_is_pure() -> None:
    observed = obs((proc(0),), held(0, 1), backoff={("m", "1.0", 1): backoff(retry_at=NOW)})
    assert plan([T], observed) == plan([T], observed)
