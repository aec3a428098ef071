"""The two servers ``scripts/bench compare`` runs side by side: TorchServe 0.12 and mqserve.

Both are used only from the outside, as a user runs them: their command line, their
``config.properties``, their HTTP ports and the process tree they start.

* TorchServe runs from a virtualenv this module creates once under the state directory
  (:func:`ensure_torchserve_venv`): ``torch==2.13.0`` is installed first, on its own, so
  that nothing after it resolves another torch; then ``torchserve==0.12.0``,
  ``torch-model-archiver==0.12.0`` and PyYAML (TorchServe's model worker imports
  ``yaml``; the torchserve wheel does not declare it), constrained to that torch. Java
  17 or newer must be on ``PATH`` (or in ``$JAVA_HOME``). The venv is reused while its
  marker file names the same pins.
* mqserve is the ``mqserve`` command of the repository's ``.venv`` (else the one on
  ``PATH``), started with a home of its own and therefore its own private Redis.

:func:`running` starts a server with a ``config.properties`` of its own (free ports,
token authorization off, model API on, the shared model store), waits until its
inference and management ports answer, and stops it on the way out whatever happened
inside: the server's own stop command first (``torchserve --stop``, ``mqserve stop``),
then SIGTERM and SIGKILL for every process of its tree that is still there. The tree is
recorded before the stop (model workers start sessions of their own, so killing the
launcher's process group alone would miss them), and for mqserve it includes the pid
files of ``$MQSERVE_HOME/run``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import BenchError, Endpoint

REPO = Path(__file__).resolve().parent.parent
#: The repository's ignored state directory (``.gitignore``): venv, homes, logs.
DEFAULT_STATE_DIR = REPO / ".bench"

TORCH_PIN = "torch==2.13.0"
TORCHSERVE_PINS = ("torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml")
#: pip's own per-connection timeout and retries, and the most one pip command may take.
PIP_TIMEOUT_S = 60
PIP_RETRIES = 3
PIP_COMMAND_TIMEOUT_S = 1800.0
JAVA_MIN_MAJOR = 17
VENV_MARKER = ".bench-ready"

START_TIMEOUT_S = 120.0
#: ``torchserve --stop --foreground`` waits up to 60 s for the frontend itself.
STOP_COMMAND_TIMEOUT_S = 90.0
KILL_GRACE_S = 10.0
#: A mqserve stop bounded by this grace (config.properties ``stop_grace``): the bench
#: never leaves work in flight when it stops a server.
MQSERVE_STOP_GRACE_S = 5
#: Number of worker slots reserved after TorchServe's ``initial_worker_port``.
TS_WORKER_PORTS = 32

Progress = Callable[[str], None]
_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


# -- pure helpers ---------------------------------------------------------------------------


def java_major(version_output: str) -> int | None:
    """The major version in ``java -version``'s output (``"17.0.15"`` -> 17, ``"1.8.0"`` -> 8)."""
    match = _JAVA_VERSION.search(version_output)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def venv_marker_text() -> str:
    """What the ready marker of a complete TorchServe venv holds: every pin, one a line."""
    return "\n".join((TORCH_PIN, *TORCHSERVE_PINS)) + "\n"


def config_properties(
    ports: Mapping[str, int], model_store: Path, extra: Mapping[str, str] | None = None
) -> str:
    """A ``config.properties`` both servers read: addresses on 127.0.0.1, no tokens,
    the model API on, ``model_store``; ``extra`` adds server-specific keys."""
    lines = [
        "# written by scripts/bench compare",
        f"inference_address=http://127.0.0.1:{ports['inference']}",
        f"management_address=http://127.0.0.1:{ports['management']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}",
        # Both servers open gRPC ports too (7070/7071 by default): free ones, so that
        # the two never collide.
        f"grpc_inference_port={ports['grpc_inference']}",
        f"grpc_management_port={ports['grpc_management']}",
        "disable_token_authorization=true",
        "enable_model_api=true",
        f"model_store={model_store}",
    ]
    lines += [f"{key}={value}" for key, value in (extra or {}).items()]
    return "\n".join(lines) + "\n"


def parse_pid_file(text: str) -> tuple[int, float | None] | None:
    """``(pid, start time)`` from a mqserve pid file (pid line, then start-time line)."""
    lines = text.split()
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None
    try:
        started = float(lines[1]) if len(lines) > 1 else None
    except ValueError:
        started = None
    return pid, started


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for a server: without the variables that would point
    it elsewhere (``PYTHONPATH``, mqserve's and TorchServe's own), plus ``extra``."""
    dropped = ("PYTHONPATH", "MQSERVE_HOME", "MQSERVE_REDIS_URL", "TS_CONFIG_FILE")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("TS_")}
    env.update(extra)
    return env


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (held open together while
    chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]


def ts_worker_port_base() -> int:
    """A TorchServe ``initial_worker_port`` whose worker sockets (``/tmp/.ts.sock.<port>``,
    the frontend's choice) are all unused, so another TorchServe on the host cannot clash."""
    for base in range(29_500, 60_000, TS_WORKER_PORTS):
        # TorchServe's own fixed path, only looked at here.
        sockets = (Path(f"/tmp/.ts.sock.{p}") for p in range(base, base + TS_WORKER_PORTS))  # noqa: S108
        if not any(path.exists() for path in sockets):
            return base
    raise BenchError("no free range of TorchServe worker sockets under /tmp")


# -- Java and the TorchServe virtualenv ------------------------------------------------------


def check_java() -> str:
    """The java binary TorchServe will run (``$JAVA_HOME/bin/java``, else ``java`` on PATH),
    after checking it is Java 17 or newer; :class:`BenchError` saying what to install."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    hint = "TorchServe 0.12 needs Java 17 (Debian/Ubuntu: apt-get install openjdk-17-jdk-headless)"
    if java is None or not Path(java).is_file():
        raise BenchError(f"java is not on PATH: {hint}")
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{java} -version failed: {exc}; {hint}") from exc
    major = java_major(done.stderr + done.stdout)
    if major is None or major < JAVA_MIN_MAJOR:
        raise BenchError(f"{java} is not Java {JAVA_MIN_MAJOR}+ ({done.stderr.strip()!r}): {hint}")
    return java


def java_version() -> str:
    """The first line of ``java -version`` (for the report), or ``"?"``."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired, BenchError):
        java = check_java()
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
        lines = (done.stderr or done.stdout).splitlines()
        return lines[0].strip() if lines else "?"
    return "?"


def _pip(python: Path, args: Sequence[str], log: Path, say: Progress) -> None:
    argv = [
        str(python),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--timeout",
        str(PIP_TIMEOUT_S),
        "--retries",
        str(PIP_RETRIES),
        *args,
    ]
    say("bench: " + " ".join(argv[1:]))
    with log.open("a") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        try:
            done = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=PIP_COMMAND_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"pip failed: {exc} (log: {log})") from exc
    if done.returncode != 0:
        text = log.read_text(errors="replace").strip().splitlines()[-20:]
        raise BenchError(f"pip exited with {done.returncode} (log: {log}):\n" + "\n".join(text))


def ensure_torchserve_venv(state_dir: Path, progress: Progress | None = None) -> Path:
    """The TorchServe virtualenv under ``state_dir`` (created on first use); its path.

    Checks Java first. A venv whose marker names other pins, or that has no marker (an
    install that was interrupted), is recreated from scratch.
    """
    say = progress or (lambda _line: None)
    check_java()
    venv = state_dir / "torchserve-venv"
    marker = venv / VENV_MARKER
    if marker.is_file() and marker.read_text() == venv_marker_text():
        return venv
    if venv.exists():
        shutil.rmtree(venv)
    state_dir.mkdir(parents=True, exist_ok=True)
    say(f"bench: creating the TorchServe virtualenv {venv} (once)")
    started = time.monotonic()
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"cannot create the virtualenv {venv}: {exc}") from exc
    python = venv / "bin" / "python"
    log = state_dir / "torchserve-venv.log"
    log.write_text("")
    # torch first and alone: a later resolution must find it installed, never pick another.
    _pip(python, [TORCH_PIN], log, say)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    _pip(python, ["-c", str(constraints), *TORCHSERVE_PINS], log, say)
    marker.write_text(venv_marker_text())
    say(f"bench: TorchServe virtualenv ready in {time.monotonic() - started:.0f} s")
    return venv


def mqserve_command() -> str:
    """The ``mqserve`` executable: the repository's ``.venv/bin/mqserve``, else PATH's."""
    local = REPO / ".venv" / "bin" / "mqserve"
    if local.is_file():
        return str(local)
    found = shutil.which("mqserve")
    if found is None:
        raise BenchError("no mqserve command: run scripts/setup (it creates .venv)")
    return found


# -- running servers ------------------------------------------------------------------------


@dataclass
class Server:
    """One running server as the benchmark sees it."""

    name: str
    inference: str
    management: str
    root_pid: int
    home: Path
    log: Path
    #: mqserve: its home's ``run`` directory (pid files); None for TorchServe.
    run_dir: Path | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.management)

    def worker_pids(self) -> list[int]:
        """The live model worker processes, by pid.

        TorchServe: the ``model_service_worker`` processes under the frontend. mqserve:
        the workers recorded in ``$MQSERVE_HOME/run/workers/*.pid`` (checked against
        their start time, so a reused pid is not taken for a worker).
        """
        import psutil

        if self.run_dir is None:
            pids = []
            for proc in _tree(self.root_pid):
                with contextlib.suppress(psutil.Error):
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue  # exited, not yet reaped by the frontend
                    if any("model_service_worker" in part for part in proc.cmdline()):
                        pids.append(proc.pid)
            return sorted(pids)
        return sorted(_recorded_pids(self.run_dir / "workers"))

    def processes(self) -> list[Any]:
        """Every live process of this server: the launcher's tree, plus for mqserve what
        its pid files record (workers that outlived their supervisor included)."""
        import psutil

        found = {proc.pid: proc for proc in _tree(self.root_pid)}
        pids: set[int] = set()
        if self.run_dir is not None:
            pids |= _recorded_pids(self.run_dir) | _recorded_pids(self.run_dir / "workers")
        for pid in pids - set(found):
            with contextlib.suppress(psutil.Error):
                found[pid] = psutil.Process(pid)
                found.update((child.pid, child) for child in found[pid].children(recursive=True))
        return list(found.values())


def _tree(root: int) -> list[Any]:
    import psutil

    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


def _recorded_pids(directory: Path) -> set[int]:
    """Pids of the pid files in ``directory`` whose process is that very process."""
    import psutil

    pids: set[int] = set()
    for path in directory.glob("*.pid"):
        with contextlib.suppress(OSError):
            parsed = parse_pid_file(path.read_text())
            if parsed is None:
                continue
            pid, started = parsed
            with contextlib.suppress(psutil.Error):
                if started is None or abs(psutil.Process(pid).create_time() - started) < 1.0:
                    pids.add(pid)
    return pids


def _wait_ready(server: Server, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until ``/ping`` answers 200 and ``GET /models`` answers on the management port."""
    deadline = time.monotonic() + timeout
    inference = Endpoint(server.inference, timeout=5)
    management = Endpoint(server.management, timeout=5)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {proc.returncode} while starting; log {server.log}:\n"
                + _tail(server.log)
            )
        with contextlib.suppress(BenchError):
            if (
                inference.request("GET", "/ping").status == 200
                and management.request("GET", "/models").status == 200
            ):
                return
        time.sleep(0.2)
    raise BenchError(
        f"{server.name} did not answer within {timeout:.0f} s; log {server.log}:\n"
        + _tail(server.log)
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _describe(proc: Any) -> str:
    import psutil

    try:
        return f"{proc.pid} ({' '.join(proc.cmdline())[:80] or proc.name()})"
    except psutil.Error:
        return str(proc.pid)


def _alive(proc: Any) -> bool:
    """Running and not a zombie (a zombie is dead; only its parent's wait remains)."""
    import psutil

    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(procs: Sequence[Any], grace: float) -> list[str]:
    """SIGTERM every process still alive, SIGKILL what is left after ``grace``; the
    processes that had to be signalled, described."""
    import psutil

    alive = [proc for proc in procs if _alive(proc)]
    described = [_describe(proc) for proc in alive]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, left = psutil.wait_procs(alive, timeout=grace)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=grace)
    return described


def _stop(
    server: Server,
    proc: subprocess.Popen[bytes],
    stop_argv: Sequence[str],
    env: Mapping[str, str],
    say: Progress,
) -> None:
    """The server's own stop, then whatever of its tree is left, then the launcher."""
    procs = server.processes()  # before the stop: afterwards orphans have no parent to find
    try:
        subprocess.run(
            list(stop_argv),
            cwd=server.home,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=STOP_COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"bench: {server.name} stop command failed ({exc}); killing its processes")
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: nothing else is in the group
    killed = _reap([*procs, *server.processes()], KILL_GRACE_S)
    if killed:
        say(f"bench: {server.name} left {', '.join(killed)} after its stop; stopped them")
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)


@contextlib.contextmanager
def running(
    kind: str, state_dir: Path, model_store: Path, progress: Progress | None = None
) -> Iterator[Server]:
    """Start server ``kind`` (``"torchserve"`` or ``"mqserve"``), yield it once it answers,
    and stop it, with every process it started, when the block ends in any way."""
    say = progress or (lambda _line: None)
    home = state_dir / f"{kind}-run"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config = home / "config.properties"
    log = home / "server.log"
    if kind == "torchserve":
        venv = ensure_torchserve_venv(state_dir, say)
        tmp = home / "tmp"  # TorchServe's pid file lives in $TMPDIR: one per server
        tmp.mkdir()
        worker_port = {"initial_worker_port": str(ts_worker_port_base())}
        config.write_text(config_properties(ports, model_store, worker_port))
        path = f"{venv / 'bin'}:{os.environ.get('PATH', '')}"
        env = clean_env({"TMPDIR": str(tmp), "PATH": path})
        torchserve = str(venv / "bin" / "torchserve")
        start_argv = [
            torchserve,
            "--start",
            "--ncs",
            "--foreground",
            "--ts-config",
            str(config),
            "--model-store",
            str(model_store),
        ]
        stop_argv = [torchserve, "--stop", "--foreground"]
        run_dir = None
    elif kind == "mqserve":
        mqserve = mqserve_command()
        config.write_text(
            config_properties(ports, model_store, {"stop_grace": str(MQSERVE_STOP_GRACE_S)})
        )
        env = clean_env({"MQSERVE_HOME": str(home / "home")})
        start_argv = [
            mqserve,
            "start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(config),
            "--model-store",
            str(model_store),
        ]
        stop_argv = [mqserve, "stop"]
        run_dir = home / "home" / "run"
    else:
        raise BenchError(f"unknown server {kind!r}")
    say(f"bench: starting {kind} on ports {ports['inference']}/{ports['management']}")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            start_argv,
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(
        name=kind,
        inference=f"http://127.0.0.1:{ports['inference']}",
        management=f"http://127.0.0.1:{ports['management']}",
        root_pid=proc.pid,
        home=home,
        log=log,
        run_dir=run_dir,
    )
    try:
        started = time.monotonic()
        _wait_ready(server, proc, START_TIMEOUT_S)
        say(f"bench: {kind} answers after {time.monotonic() - started:.1f} s")
        yield server
    finally:
        _stop(server, proc, stop_argv, env, say)
