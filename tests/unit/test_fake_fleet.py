"""The fake fleet the management API's tests run on decides nothing itself: the real
supervisor counts and times its workers, and each worker loads its archive with the real
loader (``tests.support.fakes.FakeFleet``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from falcon import testing

from control.core import observed
from control.core.observed import WorkerState
from tests.support.archives import build_mar
from tests.support.fakes import FakeFleet
from tests.support.processes import wait_for
from workers.supervisor.plan import BACK_OFF
from workers.worker.process import EXIT_LOAD_FAILED

BAD_WEIGHTS = """\
def handle(data, context):
    if data is None:
        raise ValueError("bad weights")
"""


def answer(text: str) -> str:
    """A handler module ``model_handler`` (the same name in every archive) answering ``text``."""
    return f"def handle(data, context):\n    return None if data is None else [{text!r}]\n"


def states(redis_client: Any, name: str) -> list[tuple[WorkerState, str]]:
    return [(r.state, r.reason) for r in observed.workers_of(redis_client, name, "1.0")]


def test_a_handler_error_is_the_loaders_text(
    client: testing.TestClient, fleet: FakeFleet, store_dir: Path, redis_client: Any
) -> None:
    extra = {"bad_handler.py": BAD_WEIGHTS.encode()}
    build_mar(store_dir / "bad.mar", "bad", handler="bad_handler.py", extra=extra)
    client.simulate_post("/models", params={"url": "bad.mar"})
    result = client.simulate_put("/models/bad", params={"min_worker": "1", "synchronous": "true"})
    assert result.status_code == 500
    failed = (WorkerState.FAILED, "ValueError: bad weights (bad_handler.py, line 3)")
    wait_for(lambda: states(redis_client, "bad") == [failed], 5, "the failure in the record")


def test_a_load_slower_than_startup_timeout_is_killed_by_the_supervisor(
    client: testing.TestClient, fleet: FakeFleet, redis_client: Any
) -> None:
    client.simulate_post("/models", params={"url": "noop.mar", "startup_timeout": "0"})
    result = client.simulate_put("/models/noop", params={"min_worker": "1", "synchronous": "true"})
    assert result.status_code == 500
    failed = (WorkerState.FAILED, "Model load exceeded startup_timeout of 0 s")
    wait_for(lambda: states(redis_client, "noop") == [failed], 5, "the failure in the record")
    [worker] = fleet.spawned
    assert worker.model is None  # killed while loading


def test_a_failed_slot_is_retried_after_the_back_off(
    client: testing.TestClient, fleet: FakeFleet
) -> None:
    params = {"url": "noop.mar", "handler": "invalidHandler", "initial_workers": "1"}
    params["synchronous"] = "false"
    assert client.simulate_post("/models", params=params).status_code == 202
    wait_for(lambda: len(fleet.spawned) == 2, 5, "the slot's retry")
    first, retry = fleet.spawned
    assert first.reporter.record.wid == retry.reporter.record.wid  # the same slot's worker
    assert first.returncode == EXIT_LOAD_FAILED
    # TorchServe's first back-off is 1 s, counted from the failure.
    assert retry.reporter.record.started_at - first.reporter.record.since >= BACK_OFF[1]


def test_each_archive_loads_its_own_handler_module(
    client: testing.TestClient, fleet: FakeFleet, store_dir: Path
) -> None:
    for name in ("first", "second"):
        extra = {"model_handler.py": answer(name).encode()}
        build_mar(store_dir / f"{name}.mar", name, handler="model_handler.py", extra=extra)
        params = {"url": f"{name}.mar", "initial_workers": "1"}
        assert client.simulate_post("/models", params=params).status_code == 200
    answers = {}
    for worker in fleet.spawned:
        assert worker.model is not None
        answers[worker.reporter.record.model] = worker.model.entry_point(
            [{"body": b""}], worker.model.context
        )
    assert answers == {"first": ["first"], "second": ["second"]}
