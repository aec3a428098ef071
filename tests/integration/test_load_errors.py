"""A handler that fails to load: the worker's log holds the whole traceback, and
describe's ``lastError`` says what was raised and where in the handler."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from control.core import observed
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import management_process, supervisor_process, wait_for

HANDLERS = Path(__file__).resolve().parents[1] / "support" / "handlers"
RAISES = """\
class ModelHandler:
    def initialize(self, context):
        weights = context.system_properties["model_dir"]
        raise ValueError(f"bad weights in {weights}/model.pt")

    def handle(self, data, context):
        return data
"""
SYNTAX = "import os\n\ndef handle(data, context:\n    return data\n"


def syntax_message() -> str:
    try:
        compile(SYNTAX, "x.py", "exec")
    except SyntaxError as exc:
        return str(exc.msg)
    raise AssertionError("SYNTAX compiles")


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    build_mar(store / "raises.mar", "raises", handler="model_handler.py",
              extra={"model_handler.py": RAISES.encode()})  # fmt: skip
    build_mar(store / "syntax.mar", "syntax", handler="bad_handler.py",
              extra={"bad_handler.py": SYNTAX.encode()})  # fmt: skip
    build_mar(store / "missing.mar", "missing", handler="broken_import.py",
              extra={"broken_import.py": (HANDLERS / "broken_import.py").read_bytes()})  # fmt: skip
    home = tmp_path / "h1"
    with (
        management_process(stack_settings, tmp_path / "api") as base,
        supervisor_process(stack_settings, home, "h1"),
    ):
        yield {"api": ManagementClient(base), "home": home}


def last_error(api: ManagementClient, model: str) -> str:
    response = api.describe(model)
    assert response.status == 200, response.body
    workers = response.json()[0]["workers"]
    return str(workers[0].get("lastError", "")) if workers else ""


@pytest.mark.parametrize(
    ("model", "handler", "line", "summary"),
    [
        ("raises", "model_handler.py", 4, "ValueError: bad weights in model.pt"),
        ("syntax", "bad_handler.py", 3, "SyntaxError: {syntax}"),
        (
            "missing",
            "broken_import.py",
            3,
            "ModuleNotFoundError: No module named 'mqserve_test_missing_dependency'",
        ),
    ],
)
def test_load_failure_is_logged_in_full_and_summarised_in_describe(
    stack: dict[str, Any],
    real_redis: redis.Redis,
    model: str,
    handler: str,
    line: int,
    summary: str,
) -> None:
    api, home = stack["api"], stack["home"]
    response = api.register_model_with_params(
        {"url": f"{model}.mar", "initial_workers": 1, "synchronous": "false"}
    )
    assert response.status == 202, response.body
    expected = f"{summary.format(syntax=syntax_message())} ({handler}, line {line})"
    seen = [""]

    def shows_expected() -> bool:
        seen[0] = last_error(api, model) or seen[0]  # between retries it is absent
        return seen[0] == expected

    try:
        wait_for(shows_expected, 60, f"lastError {expected!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen[0]!r}") from None

    (record,) = observed.workers_of(real_redis, model, "1.0")
    log = (home / "logs" / f"worker-{record.wid}.log").read_text()
    assert f"model {model}:1.0 failed to load: {expected}" in log
    assert "Traceback (most recent call last):" in log
    # The frame (or, for a syntax error, the offending line) in the unpacked handler.
    unpacked = re.escape(str((home / "models" / "h1" / model / "1.0").resolve()))
    frame = rf'File "{unpacked}/[0-9a-f]{{16}}/{re.escape(handler)}", line {line}'
    assert re.search(frame, log), log
    if model == "raises":  # the full message, with the path lastError leaves out
        assert re.search(r"ValueError: bad weights in /\S+/model\.pt", log), log
    assert api.unregister_model(model).status == 200
