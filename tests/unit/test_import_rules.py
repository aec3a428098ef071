"""The import direction of docs/architecture.md, as import-linter contracts in
pyproject.toml: the core imports nothing else of ours, the control plane never imports
the workers, workers load no HTTP framework, the APIs stay independent, and the
supervisor sits above the worker above the handler, and no modules or folders import
each other in a cycle. Lazy imports count (grimp reads
every import statement)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from importlinter import configuration
from importlinter.application import use_cases

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_contract_is_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)  # the packages are found from the repository root
    configuration.configure()  # what the lint-imports command does first
    kept = use_cases.lint_imports(
        config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True
    )
    assert kept is True, capsys.readouterr().out


def test_the_contracts_name_the_rules_of_the_architecture() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {c["name"]: c for c in config["contracts"]}
    core = contracts["The core imports nothing else of ours"]
    assert core["source_modules"] == ["control.core"] and "workers" in core["forbidden_modules"]
    no_http = contracts["The supervisor and the model workers load no HTTP framework nor API"]
    assert {"falcon", "gunicorn"} <= set(no_http["forbidden_modules"])
    assert config["include_external_packages"] is True  # else falcon could not be forbidden
    acyclic = contracts["No import cycles among the modules and folders of either package"]
    assert acyclic["type"] == "acyclic_siblings" and acyclic["ancestors"] == ["control", "workers"]
    assert contracts["Supervisor above worker above handler"]["layers"] == [
        "workers.supervisor", "workers.worker", "workers.handling",
    ]  # fmt: skip
