"""``scripts/bench lifecycle`` against a fake management API served on 127.0.0.1.

The fake answers like TorchServe's management API (register, scale, describe,
unregister, token check), loads the archive the benchmark wrote into the model store and
runs its handler as TorchServe would (``handle(None, ctx)`` to initialise, then a batch),
and can be told to answer one request with a chosen status.
"""

from __future__ import annotations

import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from bench.cli import main
from bench.client import BenchError, Endpoint
from bench.lifecycle import NOOP_MODEL, format_table, measure_lifecycle, write_archive
from tests.support.json_server import json_server

TOKEN = "s3cret"
ROW_LABELS = ("sync register, 1 worker", "sync scale 1->4", "sync scale 4->1", "unregister")


class FakeManagement:
    """State and behaviour of the fake management API."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.models: dict[str, int] = {}
        self.log: list[str] = []
        #: (method, path prefix, status): answer the first matching request with status.
        self.fail: tuple[str, str, int] | None = None
        #: When False, scale requests answer 200 but change nothing (a lying server).
        self.scale_works = True
        self.lock = threading.Lock()

    def answer(self, method: str, target: str, auth: str | None) -> tuple[int, Any]:
        parts = urlsplit(target)
        params = {key: values[0] for key, values in parse_qs(parts.query).items()}
        with self.lock:
            self.log.append(f"{method} {parts.path}")
            if auth != f"Bearer {TOKEN}":
                return 400, _error(400, "InvalidKeyException", "Token Authorization failed.")
            if self.fail and method == self.fail[0] and parts.path.startswith(self.fail[1]):
                status = self.fail[2]
                self.fail = None
                return status, {"status": "injected"}
            return self._route(method, parts.path, params)

    def _route(self, method: str, path: str, params: dict[str, str]) -> tuple[int, Any]:
        if method == "POST" and path == "/models":
            return self._register(params)
        name = path.removeprefix("/models/")
        if name not in self.models:
            return 404, _error(404, "ModelNotFoundException", f"Model not found: {name}")
        if method == "GET":
            workers = [{"id": str(9000 + i), "status": "READY"} for i in range(self.models[name])]
            return 200, [{"modelName": name, "modelVersion": "1.0", "workers": workers}]
        if method == "PUT":
            if self.scale_works:
                self.models[name] = int(params.get("min_worker", "1"))
            return 200, {"status": f"Workers scaled to {params.get('min_worker')}"}
        if method == "DELETE":
            del self.models[name]
            return 200, {"status": f'Model "{name}" unregistered'}
        return 405, _error(405, "MethodNotAllowedException", "Requested method is not allowed")

    def _register(self, params: dict[str, str]) -> tuple[int, Any]:
        assert params["synchronous"] == "true"
        with zipfile.ZipFile(self.store / params["url"]) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            source = mar.read(manifest["model"]["handler"]).decode()
        name = manifest["model"]["modelName"]
        namespace: dict[str, Any] = {}
        exec(compile(source, manifest["model"]["handler"], "exec"), namespace)
        assert namespace["handle"](None, object()) is None  # initialise, as TorchServe does
        assert namespace["handle"]([{"body": b"x"}], object()) == [b"x"]
        if name in self.models:
            return 409, _error(409, "ConflictStatusException", "already registered")
        self.models[name] = int(params["initial_workers"])
        return 200, {"status": f'Model "{name}" Version: 1.0 registered with 1 initial workers'}


def _error(code: int, kind: str, message: str) -> dict[str, Any]:
    return {"code": code, "type": kind, "message": message}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def fake(store: Path) -> Iterator[tuple[FakeManagement, str]]:
    state = FakeManagement(store)

    with json_server(
        lambda method, path, auth, body: state.answer(method, path, auth), indent=2
    ) as url:
        yield state, url


def bench(url: str, store: Path, *extra: str) -> int:
    return main(["lifecycle", "--management", url, "--model-store", str(store), *extra])


def test_table_has_every_row_and_cleans_up(
    fake: tuple[FakeManagement, str], store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = fake
    assert bench(url, store, "--token", TOKEN, "--runs", "2", "--slow-init", "0.01") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["what", "median", "min", "max"]
    for label in (*ROW_LABELS, "sync register, 0.01 s initialize"):
        row = next(line for line in lines if line.startswith(label + "  "))
        assert len(row.removeprefix(label).split()) == 3  # median, min, max
    assert "compare with TorchServe: scripts/bench lifecycle --management " in out
    assert state.log.count("POST /models") == 4  # 2 noop + 2 slow registrations
    assert state.log.count("PUT /models/bench-noop") == 4
    assert state.models == {}
    assert list(store.iterdir()) == []  # the archives are removed again


def test_json_output(
    fake: tuple[FakeManagement, str],
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, url = fake
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": TOKEN}, "inference": {"key": "x"}}))
    assert bench(url, store, "--key-file", str(key_file), "--runs", "3", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == 3
    assert [row["what"] for row in result["rows"]] == list(ROW_LABELS)
    for row in result["rows"]:
        assert len(row["samples"]) == 3
        assert row["min"] <= row["median"] <= row["max"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/models", 500),
        ("POST", "/models", 206),  # 2xx, but a synchronous register that did not finish
        ("PUT", "/models/bench-noop", 500),
        ("DELETE", "/models/bench-noop", 408),
    ],
)
def test_an_unexpected_status_fails_loudly(
    fake: tuple[FakeManagement, str],
    store: Path,
    capsys: pytest.CaptureFixture[str],
    method: str,
    path: str,
    status: int,
) -> None:
    state, url = fake
    state.fail = (method, path, status)
    assert bench(url, store, "--token", TOKEN) == 1
    err = capsys.readouterr().err
    assert f"answered {status} (expected 200)" in err
    assert state.models == {}  # the cleanup unregistered what the failed run left
    assert list(store.iterdir()) == []


def test_a_scale_that_changes_nothing_fails(fake: tuple[FakeManagement, str], store: Path) -> None:
    state, url = fake
    state.scale_works = False
    with pytest.raises(BenchError, match="lists 1 workers after a synchronous change to 4"):
        measure_lifecycle(Endpoint(url, TOKEN), store, runs=1)


def test_missing_token_fails_with_a_hint(
    fake: tuple[FakeManagement, str], store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = fake
    assert bench(url, store) == 1
    assert "--key-file" in capsys.readouterr().err


def test_leftover_registration_is_removed_first(
    fake: tuple[FakeManagement, str], store: Path
) -> None:
    state, url = fake
    state.models[NOOP_MODEL] = 2
    said: list[str] = []
    rows = measure_lifecycle(Endpoint(url, TOKEN), store, runs=1, progress=said.append)
    assert [row.label for row in rows] == list(ROW_LABELS)
    assert said[0] == "unregistered bench-noop left over from an earlier run"
    assert "sync register, 1 worker" in format_table(rows, url, 1)


def test_archive_layout_is_torchserves_and_reproducible(store: Path) -> None:
    path = write_archive(store, NOOP_MODEL, "def handle(data, context):\n    return data\n")
    first = path.read_bytes()
    with zipfile.ZipFile(path) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        assert sorted(mar.namelist()) == ["MAR-INF/MANIFEST.json", "bench_noop_handler.py"]
    assert manifest["runtime"] == "python"
    assert manifest["model"] == {
        "modelName": "bench-noop",
        "handler": "bench_noop_handler.py",
        "modelVersion": "1.0",
    }
    write_archive(store, NOOP_MODEL, "def handle(data, context):\n    return data\n")
    assert path.read_bytes() == first
    assert sorted(p.name for p in store.iterdir()) == ["bench-noop.mar"]


def test_bad_arguments(store: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["lifecycle", "--model-store", str(store), "--runs", "0"])
    assert exc.value.code == 2
    with pytest.raises(BenchError, match="not an http"):
        Endpoint("127.0.0.1:8081")
