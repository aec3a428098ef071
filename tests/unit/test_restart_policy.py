"""The launcher's restart policy (back-off and crash-loop limit) and ``mqserve status``'s
reading of the pid files, with a fake clock and this test's own process as the child."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from control.core.home import Home, write_pid, write_private
from control.core.settings import Settings
from control.stack import launcher
from control.stack.children import Child, Running, Stack
from control.stack.restart import RestartPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def test_back_off_doubles_from_one_second_and_gives_up_at_the_fifth_crash() -> None:
    policy, clock, crashes = RestartPolicy(), FakeClock(), []
    delays = []
    for _ in range(5):
        crashes.append(clock.now)
        delay = policy.decide(crashes, clock.now)
        delays.append(delay)
        clock.advance((delay or 0) + 0.5)  # the restarted child crashes half a second later
    assert delays == [1.0, 2.0, 4.0, 8.0, None]


def test_the_delay_is_capped() -> None:
    policy = RestartPolicy(limit=100, window=1000, first_delay=1, max_delay=30)
    crashes = [float(i) for i in range(10)]
    assert policy.decide(crashes, 9.0) == 30.0


def test_crashes_older_than_the_window_are_forgotten() -> None:
    policy, clock = RestartPolicy(limit=5, window=60), FakeClock()
    crashes = [clock.now + i for i in range(4)]  # four crashes in four seconds
    clock.advance(61 + 4)  # a minute of good service
    crashes.append(clock.now)
    assert policy.recent(crashes, clock.now) == 1
    assert policy.decide(crashes, clock.now) == 1.0  # back to the first delay, no give-up


def test_a_slow_crash_loop_within_the_window_still_gives_up() -> None:
    policy = RestartPolicy(limit=3, window=60)
    assert policy.decide([0.0, 20.0], 20.0) == 2.0
    assert policy.decide([0.0, 20.0, 59.0], 59.0) is None
    assert policy.describe() == "3 times within 60 s"


# -- mqserve status from the pid files ----------------------------------------------------


def dead_pid() -> int:
    """A pid no process has (the highest pid numbers are never handed out first)."""
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


@pytest.fixture
def home(tmp_path: Path) -> Home:
    home = Home.at(tmp_path / "h")
    home.make()
    return home


def record(home: Home, name: str, pid: int) -> None:
    if pid == os.getpid():
        write_pid(home.pid_of(name), pid)
    else:  # a process that is gone: its pid file outlived it
        write_private(home.pid_of(name), f"{pid}\n123.0\n")


def test_status_of_a_healthy_stack(home: Home) -> None:
    me = os.getpid()
    for name in ("mqserve", "redis", "supervisor"):
        record(home, name, me)
    home.ready_file.write_text("x")
    assert launcher.status(home.root) == (f"running (pid {me})", True)


def test_status_names_a_child_being_restarted(home: Home) -> None:
    me = os.getpid()
    record(home, "mqserve", me)
    record(home, "redis", me)
    record(home, "supervisor", dead_pid())
    home.ready_file.write_text("x")
    text, healthy = launcher.status(home.root)
    assert (text, healthy) == (
        f"running (pid {me}; supervisor not running, being restarted)",
        False,
    )


def test_status_with_the_launcher_gone_names_the_live_children_in_start_order(
    home: Home,
) -> None:
    me = os.getpid()
    record(home, "mqserve", dead_pid())
    for name in ("supervisor", "metrics", "inference", "management", "redis"):
        record(home, name, me)
    text, healthy = launcher.status(home.root)
    assert not healthy
    assert text == (
        "running (launcher gone; redis, management, inference, metrics, supervisor alive; "
        "run `mqserve stop`)"
    )


def test_a_reused_pid_is_not_taken_for_a_child(home: Home) -> None:
    write_private(home.pid_of("redis"), f"{os.getpid()}\n1.0\n")  # another start time
    assert launcher.status(home.root) == ("not running", False)


def test_status_after_a_crash_loop_says_why(home: Home) -> None:
    write_private(home.stopped_file, "2026-01-01 00:00:00: supervisor crashed 5 times\n")
    assert launcher.status(home.root) == (
        "not running (2026-01-01 00:00:00: supervisor crashed 5 times)",
        False,
    )


# -- Stack.check: the launcher's watch loop, with fake children and a fake clock ---------


class FakeProc:
    """A child process that has exited with ``code`` (None: still running)."""

    next_pid = 10**6

    def __init__(self, code: int | None = None) -> None:
        FakeProc.next_pid += 1
        self.pid, self.code = FakeProc.next_pid, code

    def poll(self) -> int | None:
        return self.code


def fake_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Stack, list[FakeProc]]:
    stack = Stack(Settings(home=tmp_path / "h"), policy=RestartPolicy(limit=3, window=60))
    stack.home.make()
    spawned: list[FakeProc] = []

    def spawn(child: Child) -> Running:
        spawned.append(FakeProc())
        return Running(child, spawned[-1], stack.home.log_of(child.name), 0)  # type: ignore[arg-type]

    monkeypatch.setattr(stack, "_spawn", spawn)
    # A supervisor-like child: no process group of its own to kill after a crash.
    child = Child("supervisor", ("true",), lambda: True, kill_group_on_exit=False)
    stack._launch(child)
    return stack, spawned


def test_a_crashed_child_is_restarted_after_the_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stack, spawned = fake_stack(tmp_path, monkeypatch)
    stack.home.log_of("supervisor").write_text("Traceback ...\nValueError: boom\n")
    spawned[0].code = -9
    assert stack.check(100.0)  # crash noted, restart due at 101
    assert "supervisor exited unexpectedly (killed by SIGKILL); restarting it in 1 s" in caplog.text
    assert "ValueError: boom" in caplog.text  # the tail of its log
    assert len(spawned) == 1
    assert stack.check(100.9)
    assert len(spawned) == 1
    assert stack.check(101.0)
    assert len(spawned) == 2  # restarted, and running again
    assert stack.check(101.2)
    spawned[1].code = 1
    assert stack.check(102.0)  # second crash: 2 s
    assert stack.check(104.0)
    assert len(spawned) == 3
    spawned[2].code = 1
    assert not stack.check(105.0)  # third crash within 60 s: give up
    assert stack.failure == (
        "supervisor crashed 3 times within 60 s (last: exit code 1); mqserve stopped itself"
    )
