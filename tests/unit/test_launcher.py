"""Launcher pieces that need no running stack: load_models forms, pid files, preflight."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from control.core.home import Home, live_pid, write_pid, write_private
from control.stack.children import LaunchError, ensure_free, redis_child
from control.stack.launcher import expand_load_models


def test_all_expands_to_archives_and_directories_sorted(tmp_path: Path) -> None:
    for name in ("b.mar", "a.tar.gz", "c.tgz", ".hidden.mar", "notes.txt", "x.model"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d_dir").mkdir()
    (tmp_path / ".e_dir").mkdir()
    assert expand_load_models(("all",), tmp_path) == [
        (None, "a.tar.gz"),
        (None, "b.mar"),
        (None, "c.tgz"),
        (None, "d_dir"),
    ]


def test_named_and_plain_entries() -> None:
    entries = ("noop.mar", "squeeze=squeezenet.mar", "https://h/m.mar?sig=abc")
    assert expand_load_models(entries, None) == [
        (None, "noop.mar"),
        ("squeeze", "squeezenet.mar"),
        (None, "https://h/m.mar?sig=abc"),  # an "=" inside a url names nothing
    ]


def test_all_without_a_store_is_an_error() -> None:
    with pytest.raises(LaunchError, match="needs a model store"):
        expand_load_models(("all",), None)


def test_pid_files_name_only_the_recorded_process(tmp_path: Path) -> None:
    path = tmp_path / "me.pid"
    write_pid(path, os.getpid())
    assert live_pid(path) == os.getpid()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    write_private(path, f"{os.getpid()}\n12345.0\n")  # same pid, another start time
    assert live_pid(path) is None
    path.write_text("not a pid\n")
    assert live_pid(path) is None
    assert live_pid(tmp_path / "missing.pid") is None


def test_a_long_home_is_refused_with_advice(tmp_path: Path) -> None:
    home = Home.at(tmp_path / ("x" * 120))
    with pytest.raises(LaunchError, match="set MQSERVE_HOME to a shorter path"):
        redis_child(home)


def test_a_busy_port_is_reported_before_starting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"127.0.0.1:{port} is already in use"):
            ensure_free("127.0.0.1", port, "management_address")
