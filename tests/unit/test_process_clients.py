"""One Redis client (connection pool) per process and role: each process builds its
clients once, at its edge (``control.core.redis_io.connect``), and everything in it shares
them: a decoding one for the registry, records and metrics, a bytes one for frames."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from control.core import keys
from control.core.envelope import Part, Reply, Request
from control.core.observed import WorkerRecord, WorkerState
from control.core.redis_io import SOCKET_TIMEOUT, Clients, connect
from control.core.registry import Registry
from control.core.settings import SETTINGS_ENV, Settings
from control.metrics.recorder import Flusher, MetricsRecorder
from control.server import build_inference, build_management, metrics_app
from tests.support.handlers import isolated_imports, make_model_dir, make_spec
from workers.handling import load_handler
from workers.worker.heartbeat import Reporter
from workers.worker.process import parse_args, read_metrics_config, wire

URL = "redis://127.0.0.1:1/0"  # never reached: clients connect lazily


@contextlib.contextmanager
def new_pools(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[redis.ConnectionPool]]:
    """Every redis-py connection pool created inside the block."""
    made: list[redis.ConnectionPool] = []
    original = redis.ConnectionPool.__init__

    def counting(self: redis.ConnectionPool, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(redis.ConnectionPool, "__init__", counting)
        yield made


def decodes(pool: redis.ConnectionPool) -> bool:
    return bool(pool.connection_kwargs.get("decode_responses"))


def test_connect_builds_one_pool_per_role(monkeypatch: pytest.MonkeyPatch) -> None:
    with new_pools(monkeypatch) as made:
        clients = connect(URL)
    assert made == [clients.text.connection_pool, clients.frames.connection_pool]
    assert decodes(clients.text.connection_pool) and not decodes(clients.frames.connection_pool)
    for pool in made:
        assert pool.connection_kwargs["socket_timeout"] == SOCKET_TIMEOUT


@pytest.mark.parametrize("build", [build_management, build_inference], ids=["8081", "8080"])
def test_an_api_process_has_one_text_and_one_frames_pool(
    build: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home=tmp_path, redis_url=URL)
    flushed_to: list[Any] = []
    start_flusher = MetricsRecorder.start_flusher

    def spy(self: MetricsRecorder, client: Any, interval: float = 1.0) -> Flusher:
        flushed_to.append(client)
        return start_flusher(self, client, interval)

    monkeypatch.setattr(MetricsRecorder, "start_flusher", spy)
    with new_pools(monkeypatch) as made:
        build(settings)
    assert sorted(decodes(pool) for pool in made) == [False, True]
    # The metrics flusher too flushes through the process's text client (it used to
    # make a client of its own, a third pool).
    [text_pool] = [pool for pool in made if decodes(pool)]
    assert [client.connection_pool for client in flushed_to] == [text_pool]


def test_the_metrics_process_has_one_text_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "settings.json"
    path.write_text(Settings(home=tmp_path, redis_url=URL).to_json())
    monkeypatch.setenv(SETTINGS_ENV, str(path))
    with new_pools(monkeypatch) as made:
        metrics_app()
    assert [decodes(pool) for pool in made] == [True]  # it reads no frames


def test_a_worker_serves_over_the_clients_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fakeredis.FakeServer()
    clients = Clients(
        fakeredis.FakeRedis(server=server, decode_responses=True),
        fakeredis.FakeRedis(server=server),
    )
    spec = make_spec("function_handler.py")
    Registry(clients.text).register(spec, 1, 1)
    settings = Settings(home=tmp_path, redis_url=URL)
    args = parse_args(["--wid", "9000", "--model", spec.model_name, "--version", spec.version,
                       "--host", "h", "--slot", "0"])  # fmt: skip
    now = time.time()
    record = WorkerRecord("9000", spec.model_name, spec.version, "h", 1, -1,
                          WorkerState.READY, now, since=now, heartbeat=now, slot=0)  # fmt: skip
    with isolated_imports(tmp_path):
        model = load_handler(make_model_dir(tmp_path, "function_handler.py"), spec, None)
        config = read_metrics_config(settings)
        with new_pools(monkeypatch) as made:
            parts = wire(settings, args, clients, Reporter(clients.text, record), model, spec,
                         config, now)  # fmt: skip
        try:
            # The flusher, the tasks and the online loop use the process's two clients.
            assert made == []
            request = Request("r1", spec.model_name, spec.version, 0.0, now,
                              parts=(Part("body", "application/json", b'"hi"'),))  # fmt: skip
            clients.frames.lpush(keys.online_queue(spec.model_name, spec.version), request.frame())
            parts.online.serve(parts.online._batcher.next_batch(0.5))
        finally:
            parts.flusher.stop()  # one last flush, through the shared text client
    [frame] = clients.frames.lrange(keys.reply("r1"), 0, -1)
    reply = Reply.parse(frame)
    assert (reply.status, reply.body) == (200, b"hi")
    for family in ("WorkerLoadTime", "mqserve_batch_size"):  # at load, per batch
        assert clients.text.exists(keys.metrics(family))
