"""The registry over a real redis-server: atomic changes, races between API processes."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import redis

from control.core import keys
from control.core.errors import ConflictStatusException
from control.core.registry import Registry
from control.core.settings import Settings
from control.core.spec import ModelSpec
from tests.support.archives import build_mar
from tests.support.processes import management_process


def spec(name: str, version: str = "1.0") -> ModelSpec:
    return ModelSpec(
        model_name=name,
        version=version,
        url=f"{name}.mar",
        archive=f"{name}.mar",
        downloaded=False,
        handler="h.py",
    )


def request(
    base: str, method: str, path: str, params: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    query = f"?{urlencode(params)}" if params else ""
    conn.request(method, path + query)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, json.loads(body)


def test_two_api_processes_race_to_register(redis_url: str, store: Path, tmp_path: Path) -> None:
    names = [f"model{i}" for i in range(12)]
    for name in names:
        build_mar(store / f"{name}.mar", name)
    settings = Settings(
        model_store=store,
        enable_model_api=True,
        disable_token_authorization=True,
        redis_url=redis_url,
        home=tmp_path / "home",
    )
    with (
        management_process(settings, tmp_path / "a") as api_a,
        management_process(settings, tmp_path / "b") as api_b,
    ):
        for name in names:
            results: list[tuple[int, dict[str, object]]] = []
            barrier = threading.Barrier(4)

            def register(
                base: str,
                name: str,
                barrier: threading.Barrier,
                results: list[tuple[int, dict[str, object]]],
            ) -> None:
                barrier.wait()
                results.append(request(base, "POST", "/models", {"url": f"{name}.mar"}))

            threads = [
                threading.Thread(target=register, args=(b, name, barrier, results))
                for b in (api_a, api_b, api_a, api_b)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = sorted(code for code, _ in results)
            assert codes == [200, 409, 409, 409], results
            conflict = next(body for code, body in results if code == 409)
            expected = f"Model version 1.0 is already registered for model {name}"
            assert conflict["message"] == expected
        # Both processes see one shared registry.
        status_a, list_a = request(api_a, "GET", "/models")
        status_b, list_b = request(api_b, "GET", "/models")
        assert status_a == status_b == 200
        assert list_a == list_b
        assert [m["modelName"] for m in list_a["models"]] == sorted(names)  # type: ignore[index]


def test_registry_survives_new_clients(redis_url: str) -> None:
    first = Registry(redis.Redis.from_url(redis_url, decode_responses=True))
    assert first.register(spec("alpha"), 1, 2) is True
    assert first.register(spec("alpha", "2.0"), 0, 0) is False
    second = Registry(redis.Redis.from_url(redis_url, decode_responses=True))
    record = second.get("alpha")
    assert (record.spec, record.min_workers, record.max_workers) == (spec("alpha"), 1, 2)
    assert [r.spec.version for r in second.all_versions("alpha")] == ["1.0", "2.0"]


def test_concurrent_registrations_of_one_version(real_redis: redis.Redis) -> None:
    registries = [
        Registry(redis.Redis(connection_pool=real_redis.connection_pool)) for _ in range(8)
    ]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(registries))

    def attempt(reg: Registry) -> None:
        barrier.wait()
        try:
            reg.register(spec("race"), 1, 1)
            outcomes.append("ok")
        except ConflictStatusException:
            outcomes.append("conflict")

    threads = [threading.Thread(target=attempt, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
    assert real_redis.zcard(keys.versions("race")) == 1


def test_delete_removes_every_key(real_redis: redis.Redis) -> None:
    registry = Registry(real_redis)
    registry.register(spec("gone"), 0, 0)
    registry.register(spec("gone", "2.0"), 0, 0)
    registry.delete("gone", "2.0")
    registry.delete("gone", "1.0")
    assert list(real_redis.scan_iter(match="mqs:d:*gone*")) == []
    assert real_redis.zscore(keys.MODELS, "gone") is None


def test_changes_are_published(real_redis: redis.Redis) -> None:
    pubsub = real_redis.pubsub()
    pubsub.subscribe(keys.EVENTS)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    registry = Registry(real_redis)
    registry.register(spec("noisy"), 0, 0)
    registry.scale("noisy", None, 2, 2)
    events = [pubsub.get_message(timeout=5) for _ in range(2)]
    assert [e["data"] for e in events if e] == ["noisy:1.0", "noisy:1.0"]
    pubsub.close()
