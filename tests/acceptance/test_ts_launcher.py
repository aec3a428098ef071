"""TorchServe's ``ts.launcher`` usage, verbatim, where mqserve is installed.

Scripts run in subprocesses with the project's interpreter, as a user runs them: against
a stack started by ``mqserve start`` (token auth on: the helpers find the address and
the key through ``MQSERVE_HOME``), through ``ts.launcher.start``/``stop`` themselves,
and with a real ``ts`` package present, which must always win. A wheel built from the
checkout is installed into a throwaway venv to check that the fallback ships in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.archives import build_mar
from tests.support.processes import free_port, kill_recorded

ROOT = Path(__file__).resolve().parents[2]
MQSERVE = Path(sys.executable).with_name("mqserve")
COMPAT_TS = ROOT / "workers" / "compat" / "ts" / "__init__.py"

if shutil.which("redis-server") is None:  # CI installs it; never skip silently
    raise RuntimeError("redis-server is required: apt-get install -y redis-server")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would point the helpers elsewhere."""
    drop = {"TS_CONFIG_FILE", "MQSERVE_REDIS_URL", "MQSERVE_MANAGEMENT_URL", "MQSERVE_TOKEN"}
    env = {k: v for k, v in os.environ.items() if k not in drop and k != "PYTHONPATH"}
    return {**env, **extra}


def run_script(
    script: str, env: dict[str, str], python: str = sys.executable, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a file with ``python`` from a scratch directory (not the repo)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "script.py"
        path.write_text(textwrap.dedent(script))
        return subprocess.run(
            [python, str(path)],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


class Stack:
    """A private home, model store and ports; ``mqserve start`` on demand."""

    def __init__(self) -> None:
        # Short: the Redis unix socket path under the home is limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="mqt-", dir="/tmp"))
        self.home = self.root / "h"
        self.store = self.root / "store"
        self.store.mkdir()
        build_mar(self.store / "noop.mar", "noop")
        build_mar(self.store / "x.mar", "x")
        self.port = free_port()
        self.config = self.root / "config.properties"
        self.config.write_text(
            f"inference_address=http://127.0.0.1:{free_port()}\n"
            f"management_address=http://127.0.0.1:{self.port}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\n"
            f"grpc_inference_port={free_port()}\n"
            f"grpc_management_port={free_port()}\n"
        )
        self.env = clean_env(MQSERVE_HOME=str(self.home))

    def mqserve(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(MQSERVE), *args], env=self.env, capture_output=True, text=True, timeout=300
        )

    def start(self) -> None:
        started = self.mqserve(
            "start", "--ts-config", str(self.config), "--model-store", str(self.store),
            "--enable-model-api",
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr

    def cleanup(self) -> None:
        """``mqserve stop``; then, even if it failed or hung, kill what is still recorded."""
        try:
            if (self.home / "run" / "mqserve.pid").exists():
                self.mqserve("stop")
        finally:
            kill_recorded(self.home)
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One running stack, token auth on, for the verbatim examples."""
    made = Stack()
    try:
        made.start()
        assert (made.home / "key_file.json").exists()  # the helpers must present a key
        yield made
    finally:
        made.cleanup()


def describe(stack: Stack, model: str) -> Any:
    script = f"""
        import json
        from control.management.client import ManagementClient
        print(json.dumps(ManagementClient().describe({model!r}).json()))
    """
    result = run_script(script, stack.env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_example_5_register_model(stack: Stack) -> None:
    result = run_script(
        """
        from ts.launcher import register_model
        response = register_model("noop", "noop.mar")
        assert response.status_code == 200
        print(response.json())
        """,
        stack.env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == (
        "{'status': 'Model \"noop\" Version: 1.0 registered with 1 initial workers'}\n"
    )
    (described,) = describe(stack, "noop")
    assert [w["status"] for w in described["workers"]] == ["READY"]


def test_example_6_register_model_with_params(stack: Stack) -> None:
    result = run_script(
        """
        import json
        from ts.launcher import register_model_with_params
        params = (
            ("model_name", "x"),
            ("url", "x.mar"),
            ("initial_workers", "1"),
            ("synchronous", "true"),
            ("batch_size", "2"),
        )
        response = register_model_with_params(params)
        assert response.status_code == 200
        print(json.dumps(response.json()))
        """,
        stack.env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == {
        "status": 'Model "x" Version: 1.0 registered with 1 initial workers'
    }
    (described,) = describe(stack, "x")
    assert described["batchSize"] == 2
    assert [w["status"] for w in described["workers"]] == ["READY"]


def test_helpers_answer_errors_as_responses(stack: Stack) -> None:
    script = """
        from ts.launcher import register_model
        response = register_model("missing", "missing.mar")
        print(response.status_code, response.json()["type"])
    """
    result = run_script(script, stack.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["404", "ModelNotFoundException"]
    # Without the home, the key is missing: the server's own 400 comes back.
    env = {**clean_env(MQSERVE_MANAGEMENT_URL=f"http://127.0.0.1:{stack.port}")}
    env["MQSERVE_HOME"] = str(stack.root / "elsewhere")
    result = run_script(script.replace("missing", "noop"), env)
    assert result.stdout.split() == ["400", "InvalidKeyException"], result.stderr


def test_start_and_stop_run_the_server() -> None:
    stack = Stack()
    try:
        script = f"""
            from pathlib import Path
            import requests
            from ts.launcher import register_model, start, stop
            start(model_store={str(stack.store)!r}, snapshot_file={str(stack.config)!r})
            response = register_model("noop", "noop.mar")
            print(response.status_code)
            # disable_token=True, TorchServe's default there: no key needed at all.
            print(requests.get("http://127.0.0.1:{stack.port}/models", timeout=30).json())
            stop()
            print(Path({str(stack.home / "run" / "mqserve.pid")!r}).exists())
        """
        result = run_script(script, stack.env)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert "200" in lines
        assert "{'models': [{'modelName': 'noop', 'modelUrl': 'noop.mar'}]}" in lines
        assert lines[-1] == "False"  # stopped
    finally:
        stack.cleanup()


FAKE_TS = {
    "ts/__init__.py": "REAL_TORCHSERVE = True\n",
    "ts/launcher.py": "def register_model(name, url):\n    return 'the real one'\n",
}


def fake_torchserve(where: Path) -> Path:
    for name, text in FAKE_TS.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(text)
    return where


IMPORT_TS = """
    import ts.launcher
    print(ts.__file__)
    print(ts.launcher.register_model("a", "b.mar") if hasattr(ts, "REAL_TORCHSERVE") else "-")
"""


def test_ts_falls_back_to_mqserves_compat_package() -> None:
    result = run_script(IMPORT_TS, clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(COMPAT_TS), "-"]


def test_a_real_ts_earlier_on_the_path_is_never_shadowed(tmp_path: Path) -> None:
    fake = fake_torchserve(tmp_path / "fake")
    result = run_script(IMPORT_TS, clean_env(PYTHONPATH=str(fake)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(fake / "ts" / "__init__.py"), "the real one"]


def test_wheel_ships_the_fallback_and_a_later_real_ts_still_wins(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("mqserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mqserve_ts_fallback.pth", "_mqserve_ts_fallback.py"} <= names
    assert {"workers/compat/ts/__init__.py", "workers/compat/ts/launcher.py"} <= names
    assert not any(name.startswith("workers/compat/startup/") for name in names)

    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = str(target / "bin" / "python")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    # mqserve's dependencies come from this venv: a plain path line, so that this venv's
    # own .pth files (its editable mqserve) are not processed there.
    deps = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    (site / "zz_deps.pth").write_text(f"{deps}\n")
    result = run_script(IMPORT_TS, clean_env(), python=python)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(site / "workers/compat/ts/__init__.py"), "-"]

    # A real TorchServe in a site directory processed after mqserve's (a user site, or
    # the system's under --system-site-packages) still wins.
    (site / "zzz_torchserve.pth").write_text(f"{fake_torchserve(tmp_path / 'later')}\n")
    result = run_script(IMPORT_TS, clean_env(), python=python)
    assert result.returncode == 0, result.stderr
    later = tmp_path / "later" / "ts" / "__init__.py"
    assert result.stdout.splitlines() == [str(later), "the real one"]
