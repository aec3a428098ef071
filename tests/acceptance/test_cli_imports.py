"""What each entry point loads, measured in a fresh interpreter as a user starts it.

`mqserve --help` must stay light (no Celery, Kombu, Falcon or torch); a model worker
and the supervisor load no HTTP framework (Falcon, gunicorn); the APIs and the Python
clients import and build without torch, as on a host installed without the `worker`
extra. Every check runs one short ``python`` subprocess, since ``sys.modules`` of the
test process already holds everything the suite imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Makes ``import torch`` (and safetensors) fail as on a host without the worker extra.
_WITHOUT_TORCH = """
import importlib.abc, sys

class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "safetensors"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""

_REPORT = """
import json as _json, sys as _sys
print(_json.dumps(sorted({name.partition(".")[0] for name in _sys.modules})))
"""


def loaded(code: str, *, without_torch: bool = False) -> set[str]:
    """Top-level packages in ``sys.modules`` after ``code`` ran in a fresh interpreter.

    ``code`` may print; the report is the last line of stdout. A failure of ``code``
    fails the test with its stderr.
    """
    script = (_WITHOUT_TORCH if without_torch else "") + textwrap.dedent(code) + _REPORT
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


HELP = """
import control.cli
try:
    control.cli.cli.main({argv!r}, prog_name="mqserve")
except SystemExit as exc:
    assert exc.code == 0, exc.code
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["start", "--help"], ["supervisor", "--help"], ["batch", "--help"]]
)
def test_help_loads_neither_celery_falcon_nor_torch(argv: list[str]) -> None:
    modules = loaded(HELP.format(argv=argv))
    assert "click" in modules  # the command really ran
    assert modules.isdisjoint({"celery", "kombu", "falcon", "gunicorn", "torch"}), modules


def test_python_m_control_cli_help_imports_none_of_them() -> None:
    # As documented: `python -X importtime -m control.cli --help` lists every import.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "control.cli", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Usage: mqserve" in result.stdout
    imported = {
        line.rpartition("|")[2].strip().partition(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "click" in imported
    assert imported.isdisjoint({"celery", "kombu", "falcon", "gunicorn", "torch"}), imported


@pytest.mark.parametrize("module", ["workers.worker.process", "workers.supervisor.run"])
def test_model_workers_and_the_supervisor_load_no_http_framework(module: str) -> None:
    modules = loaded(f"import {module}")
    assert "workers" in modules
    assert "falcon" not in modules
    assert "gunicorn" not in modules


def test_batch_client_and_client_import_without_torch() -> None:
    modules = loaded(
        """
        import control.jobs.client, control.management.client
        from control import cli
        """,
        without_torch=True,
    )
    assert {"control", "redis", "click"} <= modules  # the clients really imported
    assert "torch" not in modules
    assert "safetensors" not in modules


def test_the_api_apps_build_without_torch() -> None:
    # Building runs the wiring's lazy imports too; nothing connects to Redis until a
    # request comes (the metrics flusher only retries in its daemon thread).
    modules = loaded(
        """
        from control import server
        from control.core.settings import Settings

        settings = Settings(redis_url="redis://127.0.0.1:9/0", disable_token_authorization=True)
        for build in (server.build_management, server.build_inference):
            assert callable(build(settings))
        """,
        without_torch=True,
    )
    assert {"falcon", "celery"} <= modules
    assert "torch" not in modules
    assert "safetensors" not in modules
