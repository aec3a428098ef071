"""Packaging: torch only in the `worker` extra, the checks' tools pinned, setup in order.

An API-only host or a batch client installs the base package, without torch; hosts
that run model workers add ``mqserve[worker]``. ruff, mypy and mypy's stubs are pinned
exactly, so that a new release cannot change what CI reports without a change here.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
WORKER_ONLY = ("torch", "safetensors")
CHECK_TOOLS = ("ruff", "mypy", "types-PyYAML", "types-requests")


def requirements(entries: list[str]) -> dict[str, Requirement]:
    """Requirements by their (lower-case) project name."""
    parsed = (Requirement(entry) for entry in entries)
    return {req.name.lower(): req for req in parsed}


def test_the_base_install_has_no_torch() -> None:
    base = requirements(PROJECT["dependencies"])
    for name in WORKER_ONLY:
        assert name not in base, f"{name} is a base dependency: move it to the worker extra"


def test_the_worker_extra_brings_torch_unpinned() -> None:
    worker = requirements(PROJECT["optional-dependencies"]["worker"])
    assert set(WORKER_ONLY) <= set(worker)
    # Users bring the torch build that matches their hardware: a floor, never a pin.
    assert not any(spec.operator in ("==", "===") for spec in worker["torch"].specifier)


@pytest.mark.parametrize("tool", CHECK_TOOLS)
def test_the_check_tools_are_pinned_exactly(tool: str) -> None:
    test_extra = requirements(PROJECT["optional-dependencies"]["test"])
    specs = list(test_extra[tool.lower()].specifier)
    assert [spec.operator for spec in specs] == ["=="], f"{tool}: {specs}"


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_the_installed_check_tools_are_the_pinned_ones(tool: str) -> None:
    # scripts/setup installs the test extra, so a drifted .venv means setup was skipped.
    test_extra = requirements(PROJECT["optional-dependencies"]["test"])
    (pin,) = test_extra[tool].specifier
    assert importlib.metadata.version(tool) == pin.version


def test_setup_installs_torch_before_the_worker_extra() -> None:
    # A torch already installed satisfies `torch>=...`; without it pip would resolve the
    # newest (CUDA, multi-GB) build from the index.
    setup = (ROOT / "scripts" / "setup").read_text()
    torch_at = re.search(r'pip install -q "torch==\$\{TORCH_VERSION:-2\.13\.0\}"', setup)
    package_at = re.search(r"pip install -q -e '\.\[([a-z,]+)\]'", setup)
    assert torch_at is not None and package_at is not None
    assert torch_at.start() < package_at.start()
    assert {"worker", "test"} <= set(package_at.group(1).split(","))


def test_the_image_installs_the_worker_extra_after_torch() -> None:
    # One image runs every role, the supervisor's model workers included.
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    torch_at = dockerfile.index('"torch==${TORCH_VERSION}"')
    package_at = dockerfile.index('pip install --no-cache-dir "/src[worker]"')
    assert torch_at < package_at
