"""The ASGI management app runs blocking calls in a pool of its own (``api_threads``):
while many synchronous calls wait for workers, describe, list and other blocking calls
are still answered, and asyncio's small default pool is never the limit."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import fakeredis
from falcon import testing

from control.archives.store import ModelStore
from control.core.settings import Settings
from control.management.api import create_management_app
from control.management.reads import ManagementReads
from control.management.service import ManagementService
from control.management.waiting import WaitResult
from tests.support.asgi import async_twin

#: One more than asyncio's default pool has threads (``min(32, cpus + 4)``).
WAITING = min(32, (os.cpu_count() or 1) + 4) + 1


class HeldWaiter:
    """A synchronous call's wait for workers that lasts until the test releases it."""

    def __init__(self) -> None:
        self.waiting = 0
        self.release = threading.Event()
        self._lock = threading.Lock()

    def until_ready(self, *args: Any) -> WaitResult:
        with self._lock:
            self.waiting += 1
        self.release.wait(60)
        return WaitResult(True)

    def until_at_most(self, *args: Any) -> bool:
        return True


async def until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_waiting_synchronous_calls_leave_the_port_answering(
    redis_client: fakeredis.FakeRedis, settings: Settings
) -> None:
    settings = settings.replace(api_threads=WAITING + 2)
    waiter = HeldWaiter()
    store = ModelStore(settings.model_store, settings.allowed_urls)
    service = ManagementService(settings, redis_client, store, waiter=waiter)  # type: ignore[arg-type]
    reads = ManagementReads(async_twin(redis_client))
    app = create_management_app(service, None, reads=reads)

    async def scenario() -> list[int]:
        async with testing.ASGIConductor(app) as conductor:
            for url in ("noop.mar", "noop_v2.mar"):
                result = await conductor.simulate_post("/models", params={"url": url})
                assert result.status_code == 200
            scale = {"min_worker": "1", "synchronous": "true"}
            calls = [
                asyncio.ensure_future(conductor.simulate_put("/models/noop", params=scale))
                for _ in range(WAITING)
            ]
            try:
                await until(lambda: waiter.waiting == WAITING, "every call to wait")
                # All of them wait in threads; the port still answers, reads and writes.
                assert (await conductor.simulate_get("/models/noop")).status_code == 200
                assert (await conductor.simulate_get("/models")).status_code == 200
                result = await conductor.simulate_put("/models/noop/2.0/set-default")
                assert result.status_code == 200
                assert all(not call.done() for call in calls)
            finally:
                waiter.release.set()
            return [(await call).status_code for call in calls]

    assert asyncio.run(scenario()) == [200] * WAITING
