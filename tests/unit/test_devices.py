"""GPU discovery without CUDA, and TorchServe's startup worker default."""

from __future__ import annotations

import os

import pytest

from control.core.devices import default_startup_workers, device_token, visible_gpus


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("0,1", (0, 1)),
        ("2", (2,)),
        ("", ()),
        ("-1", ()),
        ("0,-1,2", (0,)),
        ("GPU-1f2e,GPU-3c4d", (0, 1)),
    ],
)
def test_cuda_visible_devices_is_the_authority(declared: str, expected: tuple[int, ...]) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": declared}) == expected


def test_no_nvidia_smi_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("control.core.devices.shutil.which", lambda name: None)
    assert visible_gpus({}) == ()


def test_startup_workers_default() -> None:
    assert default_startup_workers(3, {"CUDA_VISIBLE_DEVICES": "0"}) == 3
    assert default_startup_workers(0, {"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert default_startup_workers(0, {"CUDA_VISIBLE_DEVICES": ""}) == (os.cpu_count() or 1)


def test_a_worker_gets_the_hosts_own_name_for_its_gpu() -> None:
    # Numbers are physical ids and stay as they are; UUIDs and MIG names are positions
    # in the host's list, so the worker must get the name, not the position.
    assert device_token(3, {"CUDA_VISIBLE_DEVICES": "2,3"}) == "3"
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-aaa, GPU-bbb"}
    assert visible_gpus(uuids) == (0, 1)
    assert [device_token(g, uuids) for g in (0, 1)] == ["GPU-aaa", "GPU-bbb"]
    assert device_token(1, {}) == "1"  # found through nvidia-smi: its index
