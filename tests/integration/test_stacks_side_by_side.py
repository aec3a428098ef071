"""Two stacks side by side on one host: each serves, and cleans up, only its own files.

Two redis-servers, two homes, one host name, and the same model name and version in
both stacks with handlers that answer differently. Worker ids start at 9000 in both,
so anything keyed by host and worker id alone would collide.
"""

from __future__ import annotations

import os
import stat
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import redis

from control.core import keys, observed
from control.core.celery_app import make_celery
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import (
    management_process,
    redis_server,
    supervisor_process,
    wait_for,
)
from workers.worker.tasks import PREDICT_TASK

HOST = "h1"
ECHO = """
def handle(data, context):
    if data is None:
        return None
    bodies = [row.get("body") for row in data]
    return ["{stack}:" + (b.decode() if isinstance(b, (bytes, bytearray)) else b) for b in bodies]
"""


def predict(settings: Settings, body: str) -> str:
    app = make_celery(settings)
    message = {
        "id": "req-1",
        "headers": {},
        "params": [{"name": "body", "content_type": "text/plain", "text": body}],
    }
    result = app.send_task(PREDICT_TASK, args=[message], queue=keys.batch_queue("echo", "1.0"))
    try:
        reply: dict[str, Any] = result.get(timeout=60)
    finally:
        result.forget()
    return str(reply["text"])


def version_dir(home: Path) -> Path:
    return home / "models" / HOST / "echo" / "1.0"


def worker_cwds(settings: Settings) -> set[Path]:
    client = redis.Redis.from_url(str(settings.redis_url), decode_responses=True)
    records = observed.workers_of(client, "echo", "1.0")
    return {Path(psutil.Process(r.pid).cwd()) for r in records if r.pid > 0}


def assert_private(home: Path, model_dir: Path) -> None:
    """Every directory from ``home/models`` down, and all inside, is 0700 and ours."""
    models = (home / "models").resolve()
    level = model_dir
    while True:
        info = os.lstat(level)
        assert stat.S_IMODE(info.st_mode) == 0o700, level
        assert info.st_uid == os.getuid(), level
        if level == models:
            break
        level = level.parent
    for dirpath, dirnames, filenames in os.walk(model_dir):
        for name in dirnames:
            assert stat.S_IMODE(os.lstat(Path(dirpath, name)).st_mode) == 0o700
        for name in filenames:
            info = os.lstat(Path(dirpath, name))
            assert stat.S_IMODE(info.st_mode) & 0o077 == 0, Path(dirpath, name)
            assert info.st_uid == os.getuid()


def register(api: ManagementClient, workers: int) -> None:
    response = api.register_model_with_params({"url": "echo.mar", "initial_workers": workers})
    assert response.status == 200, response.body


def test_two_stacks_with_the_same_model_on_one_host(
    stack_settings: Settings, store: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "home1", tmp_path / "home2"
    store2 = tmp_path / "store2"
    store2.mkdir()
    build_mar(store / "echo.mar", "echo", extra={"noop_handler.py": ECHO.format(stack="one")})
    build_mar(store2 / "echo.mar", "echo", extra={"noop_handler.py": ECHO.format(stack="two")})
    with ExitStack() as stack:
        url2 = stack.enter_context(redis_server(tmp_path / "redis2"))
        one = stack_settings.replace(home=first)
        two = stack_settings.replace(home=second, redis_url=url2, model_store=store2)
        api1 = ManagementClient(stack.enter_context(management_process(one, tmp_path / "api1")))
        api2 = ManagementClient(stack.enter_context(management_process(two, tmp_path / "api2")))
        supervisor1 = stack.enter_context(ExitStack())  # closed early below
        supervisor1.enter_context(supervisor_process(one, first, HOST))
        stack.enter_context(supervisor_process(two, second, HOST))

        register(api1, 1)
        register(api2, 2)
        assert predict(one, "hi") == "one:hi"
        assert predict(two, "hi") == "two:hi"

        # Each stack's workers run in their own home; a host's workers share one copy.
        (cwd1,) = worker_cwds(one)
        (cwd2,) = worker_cwds(two)  # both workers of stack two: one directory
        assert cwd1.parent == version_dir(first).resolve()
        assert cwd2.parent == version_dir(second).resolve()
        assert_private(first, cwd1)
        assert_private(second, cwd2)
        handler2 = (cwd2 / "noop_handler.py").read_text()

        # Unregistering in stack one removes its files only.
        assert api1.unregister_model("echo").status == 200
        wait_for(lambda: not version_dir(first).exists(), 30, "stack one's files removed")
        assert (cwd2 / "noop_handler.py").read_text() == handler2
        assert predict(two, "again") == "two:again"

        # So does stopping stack one's supervisor with a worker running.
        register(api1, 1)
        assert predict(one, "back") == "one:back"
        supervisor1.close()
        assert not version_dir(first).exists()
        assert predict(two, "still") == "two:still"
        assert worker_cwds(two) == {cwd2}

        # One worker of stack two exits: the other still uses the shared copy.
        scaled = api2.scale("echo", {"min_worker": 1, "max_worker": 1, "synchronous": "true"})
        assert scaled.status == 200, scaled.body
        client2 = redis.Redis.from_url(url2, decode_responses=True)
        wait_for(lambda: len(observed.workers_of(client2, "echo", "1.0")) == 1, 30, "scale-down")
        assert (cwd2 / "noop_handler.py").is_file()
        assert predict(two, "last") == "two:last"
    # Stopping stack two's supervisor (last) removed the files of its last worker.
    assert not version_dir(second).exists()
