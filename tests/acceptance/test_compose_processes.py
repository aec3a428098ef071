"""The compose stack without an engine: each service's own command, as local processes.

The commands, environments and health checks are read from infra/docker-compose.yml
and run as they are, with only what a container would provide swapped for local
equivalents: loopback ports instead of the container network, temporary directories
instead of volumes, and the shipped config.properties with local addresses. Then a
user's session: register a model, predict, scale, unregister.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.archives import build_mar
from tests.support.processes import free_port, kill_leftover_workers, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MQSERVE = Path(sys.executable).with_name("mqserve")
PASSWORD = "compose-test-password"
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::([-?])([^}]*))?\}")


def expand(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` interpolation."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise AssertionError(f"compose requires {name}: {arg}")
        return expand(arg or "", env)

    return _VAR.sub(one, value)


def service(name: str) -> dict[str, Any]:
    data = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    result: dict[str, Any] = data["services"][name]
    return result


class LocalStack:
    """The compose services as local processes, in one temporary directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mqc-", dir="/tmp"))
        names = ("redis", "inference", "management", "metrics", "grpc_inference", "grpc_management")
        self.ports = {name: free_port() for name in names}
        self.store = self.root / "models"
        self.store.mkdir()
        self.compose_env = {"REDIS_PASSWORD": PASSWORD}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        config = (INFRA / "config.properties").read_text()
        for which in ("inference", "management", "metrics"):
            config = re.sub(
                rf"{which}_address=.*",
                f"{which}_address=http://127.0.0.1:{self.ports[which]}",
                config,
            )
        for which in ("grpc_inference", "grpc_management"):
            config = re.sub(rf"{which}_address=.*", f"{which}_address=127.0.0.1", config)
            config += f"\n{which}_port={self.ports[which]}\n"
        config = config.replace("model_store=/models", f"model_store={self.store}")
        self.config = self.root / "config.properties"
        self.config.write_text(config)

    def localize(self, arg: str) -> str:
        arg = expand(arg, self.compose_env)
        return arg.replace("/etc/mqserve/config.properties", str(self.config))

    def env_of(self, name: str) -> dict[str, str]:
        env = {k: self.localize(str(v)) for k, v in service(name).get("environment", {}).items()}
        if "MQSERVE_REDIS_URL" in env:  # the container network's "redis:6379" is loopback here
            env["MQSERVE_REDIS_URL"] = env["MQSERVE_REDIS_URL"].replace(
                "@redis:6379", f"@127.0.0.1:{self.ports['redis']}"
            )
        home = self.root / name
        for key in ("MQSERVE_HOME", "TMPDIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
            if key in env:  # volumes become directories of this stack
                env[key] = str(home / key.lower())
                Path(env[key]).mkdir(parents=True, exist_ok=True)
        return {**os.environ, **env, "CUDA_VISIBLE_DEVICES": ""}

    def start(self, name: str) -> None:
        spec = service(name)
        argv = [self.localize(str(a)) for a in spec["command"]]
        if name == "redis":
            data = self.root / "redis-data"
            data.mkdir()
            argv += ["--port", str(self.ports["redis"]), "--bind", "127.0.0.1", "--dir", str(data)]
            argv[0] = shutil.which("redis-server") or "redis-server"
        else:
            argv = [str(MQSERVE), *argv]
        log = (self.root / f"{name}.log").open("wb")
        self.logs.append(log)
        self.procs.append(
            subprocess.Popen(argv, env=self.env_of(name), stdout=log, stderr=subprocess.STDOUT)
        )

    def healthy(self, name: str) -> bool:
        test = [self.localize(str(a)) for a in service(name)["healthcheck"]["test"]]
        if test[0] == "CMD-SHELL":
            argv = ["sh", "-c", test[1].replace("redis-cli", f"redis-cli -p {self.ports['redis']}")]
        else:
            argv = [str(MQSERVE), *test[2:]] if test[1] == "mqserve" else test[1:]
        result = subprocess.run(argv, env=self.env_of(name), capture_output=True, timeout=60)
        return result.returncode == 0

    def key(self, role: str) -> str:
        data = json.loads((self.root / "api" / "mqserve_home" / "key_file.json").read_text())
        return str(data[role]["key"])

    def request(
        self, port: str, method: str, path: str, role: str, body: str | None = None
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[port], timeout=120)
        headers = {"Authorization": f"Bearer {self.key(role)}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data

    def stop(self) -> None:
        """Stop the services, the last started first (SIGTERM, 60 s, then SIGKILL for it
        and whatever ran below it), kill the model workers a killed supervisor left, close
        the logs and remove the directory: every step runs even if one before it failed."""
        with contextlib.ExitStack() as stack:  # callbacks run last-registered first
            stack.callback(shutil.rmtree, self.root, ignore_errors=True)
            for log in self.logs:
                stack.callback(log.close)
            for home in self.root.glob("*/mqserve_home"):
                stack.callback(kill_leftover_workers, home)
            for proc in self.procs:
                stack.callback(stop_process, proc, 60)


@pytest.fixture
def local_stack() -> Iterator[LocalStack]:
    stack = LocalStack()
    try:
        yield stack
    finally:
        stack.stop()


def test_compose_services_as_local_processes(local_stack: LocalStack) -> None:
    stack = local_stack
    build_mar(stack.store / "noop.mar", "noop")
    for name in ("redis", "api", "supervisor"):  # compose's depends_on order
        stack.start(name)
        wait_for(lambda name=name: stack.healthy(name), 120, f"{name} health check")
    status, body = stack.request(
        "management", "POST", "/models?url=noop.mar&initial_workers=1", "management"
    )
    assert status == 200, body
    status, body = stack.request(
        "inference", "POST", "/predictions/noop", "inference", body='{"hello": "compose"}'
    )
    assert (status, body) == (200, {"hello": "compose"})
    status, body = stack.request(
        "management", "PUT", "/models/noop?min_worker=2&synchronous=true", "management"
    )
    assert status == 200, body
    status, body = stack.request("management", "GET", "/models/noop", "management")
    assert [w["status"] for w in body[0]["workers"]] == ["READY", "READY"]
    status, body = stack.request("management", "DELETE", "/models/noop", "management")
    assert (status, body) == (200, {"status": 'Model "noop" unregistered'})
    # The API ports bind loopback only, and Redis demands its password.
    assert stack.healthy("redis")
    denied = subprocess.run(
        ["redis-cli", "-p", str(stack.ports["redis"]), "get", "x"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "NOAUTH" in denied.stdout + denied.stderr
