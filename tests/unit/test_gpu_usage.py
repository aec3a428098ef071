"""GPU usage as TorchServe's describe shows it: nvidia-smi parsing, formatting, sampling,
and the supervisor copying samples into its GPU workers' records."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from control.core import keys, observed
from control.core.devices import (
    USAGE_UNAVAILABLE,
    GpuSampler,
    GpuUsage,
    described_device_type,
    device_type_of,
    hosts_have_gpus,
    java_number,
    parse_usage,
    start_query,
    usage_text,
)
from control.core.registry import Registry
from control.core.settings import Settings
from control.core.spec import ModelSpec
from workers.supervisor.loop import Supervisor

#: ``nvidia-smi --query-gpu=index,utilization.gpu,utilization.memory,memory.used
#: --format=csv,noheader,nounits`` on a two-GPU host, as it prints it.
TWO_GPUS = "0, 45, 12, 8192\n1, 0, 0, 3\n"
#: The same query on a MIG-enabled A100: utilisation is not reported per device.
MIG = "0, [N/A], [N/A], 3072\n1, 7, 2, 11520\n"


def test_torchserve_own_expectation() -> None:
    # TorchServe's AcceleratorTest.testUtilizationToString, verbatim.
    usage = GpuUsage(2, 80.0, 70.0, 5120)
    expected = "gpuId::2 utilization.gpu::80 % utilization.memory::70 % memory.used::5,120 MiB"
    assert usage.describe() == expected


def test_utilisation_is_a_java_float() -> None:
    # 0.0025 as a Float is 0.00249999994..., which DecimalFormat rounds down.
    usage = GpuUsage(0, 0.0025, 42.42, 1)
    expected = "gpuId::0 utilization.gpu::0.002 % utilization.memory::42.42 % memory.used::1 MiB"
    assert usage.describe() == expected


def test_parse_captured_output() -> None:
    assert parse_usage(TWO_GPUS) == {
        0: GpuUsage(0, 45.0, 12.0, 8192),
        1: GpuUsage(1, 0.0, 0.0, 3),
    }
    assert parse_usage(TWO_GPUS)[0].describe() == (
        "gpuId::0 utilization.gpu::45 % utilization.memory::12 % memory.used::8,192 MiB"
    )


def test_unreadable_lines_leave_that_gpu_unavailable() -> None:
    assert parse_usage(MIG) == {1: GpuUsage(1, 7.0, 2.0, 11520)}
    garbage = "No devices were found\n\n0, 1, 2\n-1, 1, 1, 1\nx, 1, 1, 1\n0, 1, 1, 1.5\n"
    assert parse_usage(garbage) == {}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (75.5, "75.5"),
        (42.42, "42.42"),
        (33.33333, "33.333"),
        # DecimalFormat rounds the exact binary value: 0.0015 and 0.0025 are a little
        # above their decimal spelling as doubles.
        (0.0015, "0.002"),
        (0.0025, "0.003"),
        (0.125, "0.125"),
        (0.0625, "0.062"),  # exactly half way: to even
        (999, "999"),
        (81559, "81,559"),
        (1234567.25, "1,234,567.25"),
    ],
)
def test_java_number_format(value: float, text: str) -> None:
    assert java_number(value) == text


def test_no_nvidia_smi_no_query(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("control.core.devices.shutil.which", lambda name: None)
    assert start_query() is None


def test_query_runs_the_documented_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[str], dict[str, Any]]] = []

    def popen(argv: list[str], **kwargs: Any) -> FakeQuery:
        seen.append((argv, kwargs))
        return FakeQuery(TWO_GPUS)

    monkeypatch.setattr("control.core.devices.shutil.which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr("control.core.devices.subprocess.Popen", popen)
    assert isinstance(start_query(), FakeQuery)
    ((argv, kwargs),) = seen
    assert argv == [
        "/usr/bin/nvidia-smi",
        "--query-gpu=index,utilization.gpu,utilization.memory,memory.used",
        "--format=csv,noheader,nounits",
    ]
    assert kwargs["stdout"] == subprocess.PIPE and kwargs["stdin"] == subprocess.DEVNULL


class FakeQuery:
    """A background nvidia-smi that finishes when ``done`` is set."""

    def __init__(self, out: str, code: int = 0, done: bool = True) -> None:
        self.out, self.code, self.done, self.killed = out, code, done, False

    def poll(self) -> int | None:
        return self.code if self.done else None

    def communicate(self) -> tuple[str, str]:
        return self.out, ""

    def kill(self) -> None:
        self.killed = self.done = True
        self.code = -9


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sampler_collects_without_blocking() -> None:
    clock = Clock()
    queries = [FakeQuery(TWO_GPUS, done=False), FakeQuery(MIG)]
    started: list[FakeQuery] = []

    def start() -> FakeQuery:
        started.append(queries.pop(0))
        return started[-1]

    sampler = GpuSampler(interval=5.0, timeout=10.0, start=start, clock=clock)
    assert sampler.latest() == (0, {})
    sampler.poll()  # starts the first query at once
    sampler.poll()  # still running: nothing yet, nothing new started
    assert sampler.latest() == (0, {}) and len(started) == 1
    started[0].done = True
    clock.now = 0.3
    sampler.poll()
    seq, texts = sampler.latest()
    assert seq == 1 and sorted(texts) == [0, 1]
    assert texts[1] == "gpuId::1 utilization.gpu::0 % utilization.memory::0 % memory.used::3 MiB"
    clock.now = 4.9
    sampler.poll()
    assert len(started) == 1  # the interval counts from the last start
    clock.now = 5.0
    sampler.poll()
    sampler.poll()
    assert len(started) == 2
    assert sampler.latest() == (2, {1: GpuUsage(1, 7.0, 2.0, 11520).describe()})


def test_sampler_failures_are_samples_without_usage() -> None:
    clock = Clock()
    slow = FakeQuery(TWO_GPUS, done=False)
    queries: list[Any] = [FakeQuery("", code=6), slow, None, OSError("exec format error")]

    def start() -> FakeQuery | None:
        query = queries.pop(0)
        if isinstance(query, Exception):
            raise query
        return query  # type: ignore[no-any-return]

    sampler = GpuSampler(interval=1.0, timeout=10.0, start=start, clock=clock)
    sampler.poll()
    sampler.poll()
    assert sampler.latest() == (1, {})  # nvidia-smi exited 6
    clock.now = 1.0
    sampler.poll()
    clock.now = 11.5
    sampler.poll()  # hung past its timeout: killed
    assert slow.killed and sampler.latest() == (2, {})
    clock.now = 12.5
    sampler.poll()  # nvidia-smi gone
    assert sampler.latest() == (3, {})
    clock.now = 13.5
    sampler.poll()
    assert sampler.latest() == (4, {})


def test_sampler_close_kills_a_running_query() -> None:
    query = FakeQuery(TWO_GPUS, done=False)
    sampler = GpuSampler(start=lambda: query)
    sampler.poll()
    sampler.close()
    assert query.killed


def test_usage_text() -> None:
    texts = {0: "gpuId::0 utilization.gpu::1 % utilization.memory::1 % memory.used::1 MiB"}
    assert usage_text(texts, -1) == "N/A"
    assert usage_text(texts, 0) == texts[0]
    assert usage_text(texts, 1) == USAGE_UNAVAILABLE == "failed to obtained gpu usage"


@pytest.mark.parametrize(
    ("requested", "gpus_exist", "expected"),
    [
        ("", True, "gpu"),
        ("gpu", True, "gpu"),
        ("cpu", True, "cpu"),
        ("", False, "cpu"),
        ("gpu", False, "cpu"),
        ("cpu", False, "cpu"),
    ],
)
def test_described_device_type(requested: str, gpus_exist: bool, expected: str) -> None:
    assert described_device_type(requested, gpus_exist) == expected


def test_gpus_exist_when_a_live_supervisor_announced_some() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    assert not hosts_have_gpus(client)
    assert device_type_of(client, "") == "cpu"
    client.hset(keys.host("cpu-host"), mapping={"gpus": 0, "heartbeat": 1})
    client.hset(keys.host("odd-host"), mapping={"gpus": "many"})
    assert not hosts_have_gpus(client)
    client.hset(keys.host("gpu-host"), mapping={"gpus": 2, "heartbeat": 1})
    assert hosts_have_gpus(client)
    assert device_type_of(client, "") == "gpu"
    assert device_type_of(client, "gpu") == "gpu"
    assert device_type_of(client, "cpu") == "cpu"


# -- the supervisor copies samples into its workers' records --------------------------------


class _Popen:
    """A worker process that never exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None

    def send_signal(self, sig: int) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


def _spec(name: str, device_type: str) -> ModelSpec:
    return ModelSpec(
        model_name=name,
        version="1.0",
        url=f"{name}.mar",
        archive=f"{name}.mar",
        downloaded=False,
        handler="noop_handler.py",
        device_type=device_type,
    )


def test_supervisor_writes_gpu_usage_of_its_gpu_workers(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    registry = Registry(client)
    registry.register(_spec("gpu_model", ""), 2, 2)
    registry.register(_spec("cpu_model", "cpu"), 1, 1)
    clock = Clock()
    samples = [FakeQuery(TWO_GPUS, done=False), FakeQuery("0, 99, 50, 40960\n", done=False)]
    sampler = GpuSampler(interval=5.0, start=lambda: samples[0], clock=clock)
    settings = Settings(home=tmp_path / "home", model_store=tmp_path, redis_url="redis://x")
    pids = iter(range(100, 200))
    supervisor = Supervisor(
        settings,
        client,
        "h1",
        lambda wid, model, version, slot, gpu: _Popen(next(pids)),
        gpus=(0, 1),
        usage=sampler,
    )

    def usage() -> dict[tuple[str, int], str]:
        records = [
            *observed.workers_of(client, "gpu_model", "1.0"),
            *observed.workers_of(client, "cpu_model", "1.0"),
        ]
        return {(r.model, r.gpu): r.gpu_usage for r in records}

    supervisor.tick()  # starts nvidia-smi, which has not answered yet
    assert usage() == {("gpu_model", 0): "", ("gpu_model", 1): "", ("cpu_model", -1): ""}

    samples[0].done = True
    supervisor.tick()
    assert usage() == {
        ("gpu_model", 0): (
            "gpuId::0 utilization.gpu::45 % utilization.memory::12 % memory.used::8,192 MiB"
        ),
        ("gpu_model", 1): (
            "gpuId::1 utilization.gpu::0 % utilization.memory::0 % memory.used::3 MiB"
        ),
        ("cpu_model", -1): "",  # describe shows N/A for it
    }

    samples.pop(0)
    clock.now = 5.0
    supervisor.tick()  # the next query starts
    samples[0].done = True  # GPU 1 is missing from this sample: TorchServe's failure text
    supervisor.tick()
    assert usage()[("gpu_model", 0)].startswith("gpuId::0 utilization.gpu::99 %")
    assert usage()[("gpu_model", 1)] == USAGE_UNAVAILABLE


def test_supervisor_never_creates_a_record_to_hold_usage(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    Registry(client).register(_spec("gpu_model", "gpu"), 1, 1)
    query = FakeQuery(TWO_GPUS, done=False)
    sampler = GpuSampler(start=lambda: query)
    settings = Settings(home=tmp_path / "home", model_store=tmp_path, redis_url="redis://x")
    supervisor = Supervisor(
        settings, client, "h1", lambda *args: _Popen(100), gpus=(0,), usage=sampler
    )
    supervisor.tick()
    (record,) = observed.workers_of(client, "gpu_model", "1.0")
    client.delete(keys.worker(record.wid))  # the record expired before the sample landed
    query.done = True
    supervisor.tick()
    assert not client.exists(keys.worker(record.wid))
