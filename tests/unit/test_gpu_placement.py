"""GPU placement as TorchServe does it: what the registry records from model-config, how
a supervisor picks each worker's GPU, and describe's ``deviceType``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from control.core import keys, observed
from control.core.observed import GPU_USAGE_FIELD, WorkerRecord, WorkerState
from control.core.registry import Registry
from tests.support.archives import build_mar
from workers.supervisor.plan import Observed, Process, Start, Target, plan

NOW = 1000.0
T = Target("m", "1.0", min_workers=3, max_workers=3)


def gpus_of(targets: list[Target], gpus: tuple[int, ...], *procs: Process) -> list[int]:
    observed = Observed(host="a", now=NOW, processes=procs, gpus=gpus)
    return [a.gpu for a in plan(targets, observed) if isinstance(a, Start)]


def running(model: str, slot: int, gpu: int) -> Process:
    return Process(
        wid=f"{model}-{slot}",
        model=model,
        version="1.0",
        slot=slot,
        gpu=gpu,
        spawned_at=NOW,
        state=WorkerState.READY,
        state_since=NOW,
    )


@pytest.mark.parametrize(
    ("target", "gpus", "expected"),
    [
        pytest.param(T, (0, 1), [0, 1, 0], id="unset: every GPU, round-robin"),
        pytest.param(replace(T, device_type="gpu"), (0, 1), [0, 1, 0], id="gpu: the same"),
        pytest.param(T, (), [-1, -1, -1], id="unset on a host without GPUs: CPU"),
        pytest.param(replace(T, device_type="gpu"), (), [-1, -1, -1], id="gpu, no GPUs: CPU"),
        pytest.param(replace(T, device_type="cpu"), (0, 1), [-1, -1, -1], id="cpu: never"),
        pytest.param(replace(T, device_ids=(1,)), (0, 1), [1, 1, 1], id="deviceIds pin"),
        pytest.param(replace(T, device_ids=(1, 0)), (0, 1), [1, 0, 1], id="deviceIds order"),
        pytest.param(
            replace(T, device_ids=(0, 2)), (0, 1), [0, 1, 0], id="an id out of range: list ignored"
        ),
        pytest.param(replace(T, device_ids=(1,)), (2, 3), [3, 3, 3], id="ids index visible GPUs"),
        pytest.param(
            replace(T, device_ids=(1,), device_type="cpu"), (0, 1), [-1, -1, -1], id="cpu wins"
        ),
    ],
)
def test_gpu_choice(target: Target, gpus: tuple[int, ...], expected: list[int]) -> None:
    assert gpus_of([target], gpus) == expected


def test_least_loaded_across_models() -> None:
    # Another model's two workers sit on GPU 0: this one's first two go to GPU 1.
    busy = (running("other", 0, 0), running("other", 1, 0))
    other = Target("other", "1.0", min_workers=2, max_workers=2)
    owners = {("other", "1.0"): {0: "a", 1: "a"}}
    observed = Observed(host="a", now=NOW, processes=busy, slots=owners, gpus=(0, 1))
    starts = [a for a in plan([other, T], observed) if isinstance(a, Start)]
    assert [(a.model, a.gpu) for a in starts] == [("m", 1), ("m", 1), ("m", 0)]


# -- what the registry records, and describe ------------------------------------------------


@pytest.mark.parametrize(
    ("config", "recorded"),
    [
        (None, ""),
        ("batchSize: 1\n", ""),
        ("deviceType: gpu\n", "gpu"),
        ("deviceType: GPU\n", "gpu"),
        ("deviceType: Cpu\n", "cpu"),
        ("deviceType: neuron\n", ""),  # TorchServe: NONE, i.e. the GPU default
        ("deviceType: 1\n", ""),
    ],
)
def test_registry_records_what_the_config_asked(
    client: testing.TestClient,
    store_dir: Path,
    redis_client: Any,
    config: str | None,
    recorded: str,
) -> None:
    build_mar(store_dir / "dev.mar", "dev", config_yaml=config)
    result = client.simulate_post("/models", params={"url": "dev.mar", "synchronous": "false"})
    assert result.status_code == 200, result.text
    assert Registry(redis_client).get("dev").spec.device_type == recorded


@pytest.mark.parametrize(
    ("config", "host_gpus", "described"),
    [
        (None, None, "cpu"),  # no supervisor: nobody announced GPUs
        (None, 0, "cpu"),
        (None, 2, "gpu"),
        ("deviceType: gpu\n", 2, "gpu"),
        ("deviceType: gpu\n", 0, "cpu"),
        ("deviceType: cpu\n", 2, "cpu"),
    ],
)
def test_describe_device_type(
    client: testing.TestClient,
    store_dir: Path,
    redis_client: Any,
    config: str | None,
    host_gpus: int | None,
    described: str,
) -> None:
    build_mar(store_dir / "dev.mar", "dev", config_yaml=config)
    client.simulate_post("/models", params={"url": "dev.mar", "synchronous": "false"})
    redis_client.hset(keys.host("cpu-only"), mapping={"gpus": 0, "heartbeat": NOW})
    if host_gpus is not None:
        redis_client.hset(keys.host("h1"), mapping={"gpus": host_gpus, "heartbeat": NOW})
    assert client.simulate_get("/models/dev").json[0]["deviceType"] == described


def test_describe_shows_the_supervisors_sample(
    client: testing.TestClient, redis_client: Any
) -> None:
    client.simulate_post("/models", params={"url": "noop.mar", "synchronous": "false"})
    text = "gpuId::1 utilization.gpu::7 % utilization.memory::2 % memory.used::11,520 MiB"
    for wid, gpu in (("9000", 1), ("9001", -1), ("9002", 0)):
        record = WorkerRecord(wid, "noop", "1.0", "h", 1, gpu, WorkerState.READY, NOW)
        observed.publish(redis_client, record, ttl=60)
    redis_client.hset(keys.worker("9000"), GPU_USAGE_FIELD, text)
    redis_client.hset(keys.worker("9001"), GPU_USAGE_FIELD, text)  # stale: it moved to CPU
    workers = client.simulate_get("/models/noop").json[0]["workers"]
    assert [(w["gpu"], w["gpuUsage"]) for w in workers] == [
        (True, text),
        (False, "N/A"),
        (True, "failed to obtained gpu usage"),  # not sampled (no nvidia-smi)
    ]
