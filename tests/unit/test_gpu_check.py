"""scripts/gpu-check's verdicts: what counts as "the workers run on the GPU"."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from control.stack import gpu_check
from control.stack.gpu_check import (
    CPU_MODEL,
    EXIT_FAILED,
    EXIT_NO_GPU,
    EXIT_OK,
    GPU_MODEL,
    Check,
    CheckError,
    Options,
    Probe,
    Timing,
    check_model,
    format_report,
    parse_args,
    parse_probe,
    verdict,
)

USAGE = "gpuId::0 utilization.gpu::3 % utilization.memory::1 % memory.used::1,024 MiB"
ON_GPU = [Probe(11, "cuda:0", "NVIDIA H200", "0", 0), Probe(12, "cuda:0", "NVIDIA H200", "0", 0)]


def described(device_type: str, gpu: bool, usage: str, pids: tuple[int, ...] = (11, 12)) -> Any:
    workers = [
        {"id": str(9000 + i), "status": "READY", "pid": pid, "gpu": gpu, "gpuUsage": usage}
        for i, pid in enumerate(pids)
    ]
    return {"modelName": GPU_MODEL, "deviceType": device_type, "workers": workers}


def failed(checks: list[Check]) -> list[str]:
    return [c.name for c in checks if not c.ok]


def test_parse_probe() -> None:
    body = {
        "device": "cuda:0",
        "device_name": "NVIDIA H200",
        "pid": 42,
        "cuda_visible_devices": "0",
        "gpu_id": 0,
        "mean": 0.1,
    }
    assert parse_probe(json.dumps(body).encode()) == Probe(42, "cuda:0", "NVIDIA H200", "0", 0)
    assert parse_probe(json.dumps({**body, "gpu_id": None}).encode()).gpu_id is None
    for bad in (b"not json", b"[1, 2]", json.dumps({"device": "cpu"}).encode()):
        with pytest.raises(CheckError):
            parse_probe(bad)


def test_gpu_model_that_runs_on_the_gpu_passes() -> None:
    checks = check_model(described("gpu", True, USAGE), ON_GPU, want_gpu=True)
    assert failed(checks) == [] and len(checks) == 6
    assert verdict(checks) == EXIT_OK


def test_a_worker_that_fell_back_to_the_cpu_fails() -> None:
    probes = [ON_GPU[0], Probe(12, "cpu", "cpu", "0", 0)]
    checks = check_model(described("gpu", True, USAGE), probes, want_gpu=True)
    assert failed(checks) == [f"{GPU_MODEL}: worker 9001 (pid 12) computes on cuda"]
    assert verdict(checks) == EXIT_FAILED


def test_a_worker_that_never_answered_fails() -> None:
    checks = check_model(described("gpu", True, USAGE), ON_GPU[:1], want_gpu=True)
    (name,) = failed(checks)
    assert name == f"{GPU_MODEL}: worker 9001 (pid 12) computes on cuda"
    assert "no answer from this worker" in next(c.detail for c in checks if not c.ok)


def test_describe_must_agree() -> None:
    checks = check_model(described("cpu", False, "N/A"), ON_GPU, want_gpu=True)
    assert failed(checks) == [
        f"{GPU_MODEL}: deviceType is gpu",
        f"{GPU_MODEL}: worker 9000 described on a GPU",
        f"{GPU_MODEL}: worker 9001 described on a GPU",
    ]
    unsampled = described("gpu", True, "failed to obtained gpu usage")
    assert len(failed(check_model(unsampled, ON_GPU, want_gpu=True))) == 2


def test_missing_or_unready_workers_fail() -> None:
    one = described("gpu", True, USAGE, pids=(11,))
    assert failed(check_model(one, ON_GPU, want_gpu=True)) == [f"{GPU_MODEL}: 2 workers READY"]
    loading = described("gpu", True, USAGE)
    loading["workers"][1]["status"] = "UNLOADING"
    assert failed(check_model(loading, ON_GPU, want_gpu=True)) == [f"{GPU_MODEL}: 2 workers READY"]


def test_cpu_model_must_stay_on_the_cpu() -> None:
    on_cpu = [Probe(11, "cpu", "cpu", "", None), Probe(12, "cpu", "cpu", "", None)]
    assert failed(check_model(described("cpu", False, "N/A"), on_cpu, want_gpu=False)) == []
    leaked = [on_cpu[0], replace(ON_GPU[1])]
    checks = check_model(described("cpu", False, "N/A"), leaked, want_gpu=False)
    assert failed(checks) == [f"{GPU_MODEL}: worker 9001 (pid 12) computes on cpu"]


def test_no_checks_is_no_pass() -> None:
    assert verdict([]) == EXIT_FAILED


def test_report_shows_failures_and_the_ratio() -> None:
    checks = [Check("a", True, "fine"), Check("b", False, "broken")]
    timings = [Timing(GPU_MODEL, "cuda", 100, 0.5, 0), Timing(CPU_MODEL, "cpu", 100, 4.0, 0)]
    report = format_report(checks, timings, Options())
    assert "PASS  a: fine" in report and "FAIL  b: broken" in report
    assert f"{GPU_MODEL} / {CPU_MODEL}: 8.0x" in report
    assert report.endswith("gpu-check: 1 of 2 checks FAILED")
    assert format_report(checks[:1], [], Options()).endswith("gpu-check: all 1 checks passed")


def test_timing_counts_answered_requests() -> None:
    assert Timing(GPU_MODEL, "cuda", 100, 2.0, 10).per_second == 45.0
    assert Timing(GPU_MODEL, "cuda", 100, 0.0, 0).per_second == 0.0


def test_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--requests", "10", "--keep"]) == Options(requests=10, keep=True)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--rows", "0"])
    assert exit_info.value.code == 2
    assert "give a positive integer" in capsys.readouterr().err


def test_no_gpu_exits_2_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may start without a GPU")

    monkeypatch.setattr(gpu_check, "cuda_gpu", lambda: (False, "no CUDA GPU on this machine"))
    monkeypatch.setattr(gpu_check, "run_check", never)
    assert gpu_check.main([]) == EXIT_NO_GPU
    err = capsys.readouterr().err
    assert "no CUDA GPU on this machine" in err and "nothing to check without a GPU" in err


def test_a_stack_failure_is_a_failed_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise CheckError("mqserve start failed: redis-server is missing")

    monkeypatch.setattr(gpu_check, "cuda_gpu", lambda: (True, "1 CUDA GPU(s): NVIDIA H200"))
    monkeypatch.setattr(gpu_check, "run_check", broken)
    assert gpu_check.main([]) == EXIT_FAILED
    assert "FAILED: mqserve start failed" in capsys.readouterr().err
