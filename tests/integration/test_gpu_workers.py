"""GPU placement with real supervisors and real workers, on a machine without GPUs.

The supervisor is told its GPUs through ``CUDA_VISIBLE_DEVICES`` (what
``control.core.devices.visible_gpus`` honours), and a fake ``nvidia-smi`` on its ``PATH``
answers the usage query. Each worker runs a ``BaseHandler`` subclass that writes down
what it was given (its ``CUDA_VISIBLE_DEVICES``, ``system_properties["gpu_id"]``, the
device ``BaseHandler`` chose and where the model's parameters are); the test matches
those reports to describe's workers by pid. torch.cuda is unavailable here, so
``BaseHandler`` falls back to CPU; where CUDA exists, the GPU a worker sees is cuda:0.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import manifest
from tests.support.handlers import HANDLERS
from tests.support.processes import management_process, supervisor_process, wait_for

REPORTER = '''\
"""Writes what this worker was given to $MQS_TEST_REPORTS/<pid>.json."""

import json
import os

import torch
from ts.torch_handler.base_handler import BaseHandler


class Reporter(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        report = {
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_id": context.system_properties["gpu_id"],
            "device": str(self.device),
            "parameters_on": str(next(self.model.parameters()).device),
            "cuda_available": torch.cuda.is_available(),
        }
        folder = os.environ["MQS_TEST_REPORTS"]
        partial = os.path.join(folder, f".{os.getpid()}.json")
        with open(partial, "w") as out:
            json.dump(report, out)
        os.replace(partial, os.path.join(folder, f"{os.getpid()}.json"))
'''
#: Answers the supervisor's usage query the way nvidia-smi prints it for two GPUs.
FAKE_NVIDIA_SMI = """\
#!/bin/sh
case "$*" in
  *--query-gpu=index,utilization.gpu,utilization.memory,memory.used*)
    printf '0, 37, 12, 1234\\n1, 5, 1, 81559\\n' ;;
  *) echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"""
USAGE = {
    "0": "gpuId::0 utilization.gpu::37 % utilization.memory::12 % memory.used::1,234 MiB",
    "1": "gpuId::1 utilization.gpu::5 % utilization.memory::1 % memory.used::81,559 MiB",
}


def reporter_mar(path: Path, name: str, config_yaml: str | None = None) -> Path:
    """An eager-mode archive: ``tiny_model.py`` as ``modelFile``, the reporting handler."""
    doc = manifest(name, handler="reporter.py", config_file="model-config.yaml")
    model = doc["model"]
    assert isinstance(model, dict)
    model["modelFile"] = "tiny_model.py"
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps(doc))
        mar.writestr("reporter.py", REPORTER)
        mar.writestr("tiny_model.py", (HANDLERS / "tiny_model.py").read_text())
        mar.writestr("model-config.yaml", config_yaml or "batchSize: 1\n")
    return path


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    reporter_mar(store / "spread.mar", "spread")
    reporter_mar(store / "pinned.mar", "pinned", "deviceIds: [1]\n")
    reporter_mar(store / "oncpu.mar", "oncpu", "deviceType: cpu\n")
    reports = tmp_path / "reports"
    reports.mkdir()
    with management_process(stack_settings, tmp_path / "api") as base:
        yield {
            "settings": stack_settings,
            "api": ManagementClient(base),
            "tmp": tmp_path,
            "reports": reports,
        }


def register(api: ManagementClient, name: str, workers: int) -> dict[str, Any]:
    params = {"url": f"{name}.mar", "initial_workers": workers, "synchronous": "true"}
    response = api.register_model_with_params(params)
    assert response.status == 200, response.body
    return describe(api, name)


def describe(api: ManagementClient, name: str) -> dict[str, Any]:
    response = api.describe(name)
    assert response.status == 200, response.body
    doc: dict[str, Any] = response.json()[0]
    return doc


def reports_of(folder: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each described worker's report, in describe's order."""
    found = []
    for worker in doc["workers"]:
        report = folder / f"{worker['pid']}.json"
        assert report.exists(), f"worker {worker['id']} (pid {worker['pid']}) wrote no report"
        found.append(json.loads(report.read_text()))
    return found


def assert_on_gpu(report: dict[str, Any], gpu: str) -> None:
    """The worker sees exactly ``gpu``, as its device 0, and BaseHandler used it."""
    assert report["cuda_visible_devices"] == gpu
    assert report["gpu_id"] == 0
    expected = "cuda:0" if report["cuda_available"] else "cpu"
    assert report["device"] == expected
    assert report["parameters_on"] == expected


def assert_on_cpu(report: dict[str, Any]) -> None:
    assert report["cuda_visible_devices"] == ""
    assert report["gpu_id"] is None
    assert report["device"] == report["parameters_on"] == "cpu"


def fake_nvidia_smi(folder: Path) -> Path:
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text(FAKE_NVIDIA_SMI)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder


def test_gpu_host_spreads_pins_and_keeps_cpu_models(stack: dict[str, Any]) -> None:
    api, reports = stack["api"], stack["reports"]
    env = {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "PATH": f"{fake_nvidia_smi(stack['tmp'] / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "MQS_TEST_REPORTS": str(reports),
    }
    with supervisor_process(stack["settings"], stack["tmp"] / "h1", "gpu-host", env=env):
        # No deviceType: TorchServe's default on a GPU host, round-robin over both GPUs.
        doc = register(api, "spread", 3)
        assert doc["deviceType"] == "gpu"
        assert [w["gpu"] for w in doc["workers"]] == [True, True, True]
        spread = reports_of(reports, doc)
        gpus = [r["cuda_visible_devices"] for r in spread]
        assert sorted(gpus) == ["0", "0", "1"]
        for report, gpu in zip(spread, gpus, strict=True):
            assert_on_gpu(report, gpu)
        # gpuUsage: the supervisor's nvidia-smi sample of each worker's own GPU.
        wait_for(
            lambda: (
                [w["gpuUsage"] for w in describe(api, "spread")["workers"]]
                == [USAGE[g] for g in gpus]
            ),
            30,
            "gpuUsage sampled",
        )

        # deviceIds [1]: every worker on GPU 1, whatever the load.
        doc = register(api, "pinned", 2)
        assert doc["deviceType"] == "gpu" and doc["deviceIds"] == [1]
        for report in reports_of(reports, doc):
            assert_on_gpu(report, "1")
        wait_for(
            lambda: {w["gpuUsage"] for w in describe(api, "pinned")["workers"]} == {USAGE["1"]},
            30,
            "gpuUsage of GPU 1",
        )

        # deviceType cpu: no GPU, even on a GPU host.
        doc = register(api, "oncpu", 1)
        assert doc["deviceType"] == "cpu"
        assert [(w["gpu"], w["gpuUsage"]) for w in doc["workers"]] == [(False, "N/A")]
        (report,) = reports_of(reports, doc)
        assert_on_cpu(report)


def test_host_without_gpus_runs_everything_on_cpu(stack: dict[str, Any]) -> None:
    api, reports = stack["api"], stack["reports"]
    env = {"MQS_TEST_REPORTS": str(reports)}  # the fixture's CUDA_VISIBLE_DEVICES=""
    with supervisor_process(stack["settings"], stack["tmp"] / "h1", "cpu-host", env=env):
        doc = register(api, "spread", 1)
        assert doc["deviceType"] == "cpu"
        assert [(w["gpu"], w["gpuUsage"]) for w in doc["workers"]] == [(False, "N/A")]
        (report,) = reports_of(reports, doc)
        assert_on_cpu(report)
