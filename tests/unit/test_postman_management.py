"""Replay TorchServe's own management test data (82 rows) against mqserve, in order.

The rows come from TorchServe 0.12.0's postman suite (``tests/data/torchserve-
postman/management_data.json``) and assert the HTTP status. Archives are small local
stand-ins with the same names; the remote ``torchserve.pytorch.org`` archives are served
by a fetch stub, so the suite runs offline with the allow-list the suite relies on.
Workers come from the real supervisor over in-process fake workers that load with the
real loader (``tests.support.fakes.FakeFleet``), so the models TorchServe fails to load
fail here for the same reasons: ``invalidHandler`` names no module of the archive, and
``startup_timeout=0`` is exceeded by any load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from control.core.settings import Settings
from tests.support.archives import build_mar
from tests.support.fakes import FakeFleet

POSTMAN = Path(__file__).resolve().parents[1] / "data" / "torchserve-postman"

#: Rows where mqserve answers differently on purpose, with the reason.
DEVIATIONS = {
    # TorchServe crashes with IndexOutOfBoundsException after stopping the workers; a
    # negative worker count is the client's mistake, so mqserve refuses it up front.
    "Scale worker by calling Update Worker API with negative min worker Count": 400,
}

REMOTE = {
    "densenet161.mar": "densenet161",
}


def load_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((POSTMAN / "management_data.json").read_text())
    return rows


def environment() -> dict[str, str]:
    data = json.loads((POSTMAN / "environment.json").read_text())
    return {v["key"]: v["value"] for v in data["values"]}


@pytest.fixture
def postman_store(store_dir: Path) -> Path:
    names = {"squeezenet1_1", "mnist", "densenet161", "resnet-152-batch", "resnet-18"}
    for name in names:
        build_mar(store_dir / f"{name}.mar", name)
    return store_dir


def test_management_rows(
    make_client: Any, settings: Settings, postman_store: Path, fleet: FakeFleet, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    for basename, name in REMOTE.items():
        build_mar(remote / basename, name)

    def fetch(url: str, target: Path, limit: int) -> None:
        source = remote / url.rsplit("/", 1)[-1]
        if not source.exists():
            raise OSError(f"HTTP 404 for {url}")
        target.write_bytes(source.read_bytes())

    client = make_client(
        settings.replace(allowed_urls=(r"https://torchserve\.pytorch\.org/.*",)), fetch=fetch
    )
    env = environment()
    rows = load_rows()
    assert len(rows) == 82
    mismatches = []
    for row in rows:
        path = re.sub(r"\{\{(.+?)\}\}", lambda m: env[m.group(1)], row["path"])
        route, _, query = path.partition("?")
        result = client.simulate_request(row["METHOD"].upper(), "/" + route, query_string=query)
        expected = DEVIATIONS.get(row["test"], row.get("status_code", 200))
        if result.status_code != expected:
            mismatches.append((row["test"], path, expected, result.status_code, result.text))
        if result.status_code >= 400:
            body = result.json
            assert set(body) == {"code", "type", "message"} and body["code"] == result.status_code
    assert mismatches == []
