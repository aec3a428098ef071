"""Starting worker processes, and clearing what an earlier supervisor left behind.

A worker runs :func:`workers.process.main` with its device in ``CUDA_VISIBLE_DEVICES``,
set before anything can initialise CUDA, so it never sees another GPU. It runs in its
own session, so a Ctrl-C aimed at the supervisor does not bypass the supervisor's
orderly drain, and it outlives its supervisor: a supervisor that starts adopts the live
workers an earlier one of its host left (:func:`adopt_leftovers`), so a supervisor crash
costs no request. A worker left without a supervisor drains itself once its slot lease
has been gone for ``LEASE_GRACE`` (``workers.heartbeat``).

Two ways to start one:

* :class:`ForkSpawner` (the default) forks the supervisor, which has already imported
  Celery, kombu, redis and mqserve: a worker starts in milliseconds instead of paying
  the interpreter start and imports again. This is safe because the supervisor is
  single-threaded and never imports torch or touches CUDA; the child closes every
  inherited descriptor before it does anything.
* :class:`WorkerSpawner` starts ``python -m workers.process`` afresh (``exec``), for
  hosts that prefer full isolation over start-up speed.

Model files. :class:`ModelFiles` is where a host's workers find their unpacked
archives: ``$MQSERVE_HOME/models/<host>/<model>/<version>/<registration>/``, mode 0700
all the way down, so another stack on the same host (another home) never sees, shares
or deletes them, even for the same model name and version, and other users cannot read
them. The first worker of a version unpacks it (atomically, under a lock); the other
workers of that version on this host share the copy, as TorchServe's workers share one
extracted model directory (it is their cwd, so files a handler writes there are shared
too: handlers that write per-worker files must name them per process, as under
TorchServe). The supervisor deletes a version's files when its last worker on this
host has exited, and a restarted supervisor deletes what no adopted worker uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import psutil
import redis

from control import keys, observed
from control.devices import device_token
from control.home import Home
from control.registry import VersionRecord
from workers.reconcile import EXIT_UNKNOWN

log = logging.getLogger(__name__)

#: Mode of every directory :class:`ModelFiles` makes: the stack's user's alone.
PRIVATE_DIR = 0o700
#: A host name used as a path component as it is; any other is hashed.
_PLAIN_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class WorkerProcess(Protocol):
    """The part of ``subprocess.Popen`` the supervisor uses."""

    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def worker_argv(wid: str, model: str, version: str, slot: int, gpu: int, host: str) -> list[str]:
    """The worker's command-line arguments (after ``python -m workers.process``)."""
    return [
        "--wid", wid, "--model", model, "--version", version,
        "--slot", str(slot), "--gpu", str(gpu), "--host", host,
    ]  # fmt: skip


def worker_env(settings_file: Path, gpu: int) -> dict[str, str]:
    """Environment additions for a worker: its settings and its one GPU (or none)."""
    return {
        "MQSERVE_SETTINGS": str(settings_file),
        # The worker sees only its own GPU (as cuda:0), or none at all.
        "CUDA_VISIBLE_DEVICES": device_token(gpu) if gpu >= 0 else "",
        "PYTHONUNBUFFERED": "1",
    }


def registration_tag(record: VersionRecord) -> str:
    """A directory name for one registration of a model version.

    Unregistering a version and registering it again (perhaps from another archive)
    while an old worker still drains gives a new name, so no worker ever starts on the
    files of an earlier registration. Every worker computes the same name from Redis.
    """
    identity = f"{record.registered_at!r}\n{record.spec.to_json()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def host_component(host: str) -> str:
    """``host`` as one safe path component (a name with ``/`` or ``..`` is hashed)."""
    if _PLAIN_HOST.fullmatch(host):
        return host
    return "host-" + hashlib.sha256(host.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelFiles:
    """The unpacked archives of one host's workers of one stack (see the module doc).

    ``root`` is ``$MQSERVE_HOME/models/<host>``. Names starting with ``.`` below it are
    the class's own (locks, unpacks in progress, trees being deleted); model names,
    versions and host components never start with one.
    """

    root: Path

    @classmethod
    def of(cls, home: Path, host: str) -> ModelFiles:
        """The files of ``host``'s workers in the stack whose home is ``home``."""
        return cls(Home.at(home).models_dir / host_component(host))

    def version_dir(self, model: str, version: str) -> Path:
        """Every registration of one model version unpacked on this host."""
        return self.root / model / version

    def unpack(self, model: str, version: str, tag: str, extract: Callable[[Path], Path]) -> Path:
        """The model directory of registration ``tag``, unpacked first if not done yet.

        ``extract(dest)`` unpacks the archive into the empty private directory ``dest``
        and returns the model directory in it (``ModelStore.extract``). It runs under
        an exclusive lock, at most once per registration while the files exist, into a
        temporary directory beside the final one that is then renamed into place: a
        worker starting at the same time waits for the lock and never sees a half
        written tree, and a worker killed while unpacking leaves only a temporary
        directory (deleted with the version). Errors from ``extract`` propagate.
        """
        parent = self.version_dir(model, version)
        _private_dirs(parent, top=self.root.parent)
        final = parent / tag
        with _exclusive(parent / f".{tag}.lock"):
            if not final.is_dir():
                _unpack_into(final, extract)
        return final

    def remove(self, model: str, version: str) -> None:
        """Delete every unpacked registration of a version; only once none of its workers
        on this host runs (the supervisor's count). Missing files are no error."""
        path = self.version_dir(model, version)
        # Renamed away first, so that no half-deleted tree ever sits where a worker looks.
        if _discard(path, self.root / f".removing-{uuid.uuid4().hex}"):
            with contextlib.suppress(OSError):  # the model's directory, if now empty
                path.parent.rmdir()

    def keep_only(self, versions: set[tuple[str, str]]) -> None:
        """Delete every unpacked version of this host but ``versions`` (those adopted
        workers use), and whatever an interrupted removal left."""
        if not versions:
            self.clear()
            return
        for stale in self.root.glob(".removing-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for model_dir in (p for p in self.root.glob("*") if p.is_dir() and p.name[0] != "."):
            for version_dir in (p for p in model_dir.glob("*") if p.is_dir()):
                if (model_dir.name, version_dir.name) not in versions:
                    self.remove(model_dir.name, version_dir.name)

    def clear(self) -> None:
        """Delete everything unpacked for this host: what a dead supervisor's workers left."""
        parent = self.root.parent
        for stale in parent.glob(f".{self.root.name}.removing-*"):  # an interrupted clear
            shutil.rmtree(stale, ignore_errors=True)
        _discard(self.root, parent / f".{self.root.name}.removing-{uuid.uuid4().hex}")


def _private_dirs(path: Path, top: Path) -> None:
    """Make ``path`` and every level from ``top`` down to it a directory of mode 0700.

    Those levels are this stack's own, so existing ones are set to 0700 as well;
    missing levels above ``top`` (a new home) are created with 0700 and left alone
    once they exist.
    """
    if path != top and top in path.parents:
        _private_dirs(path.parent, top)
    elif not path.parent.is_dir():
        _private_dirs(path.parent, path.parent)
    with contextlib.suppress(FileExistsError):  # or another worker made it just now
        path.mkdir(PRIVATE_DIR)
    path.chmod(PRIVATE_DIR)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the kernel drops it if we die."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _unpack_into(final: Path, extract: Callable[[Path], Path]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))  # 0700
    try:
        root = extract(staging)
        # The model directory becomes ``final``: ``staging`` itself, or its only entry
        # (a tgz archive's top directory), which leaves ``staging`` empty.
        os.rename(root, final)
        final.chmod(PRIVATE_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard(path: Path, trash: Path) -> bool:
    """Rename ``path`` to ``trash`` and delete it; False if ``path`` did not exist."""
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


class WorkerSpawner:
    """Starts workers as fresh interpreters (implements ``Spawner``)."""

    def __init__(self, settings_file: Path, host: str, log_dir: Path) -> None:
        self._settings_file = settings_file
        self._host = host
        self._log_dir = log_dir

    def __call__(self, wid: str, model: str, version: str, slot: int, gpu: int) -> WorkerProcess:
        argv = [
            sys.executable, "-m", "workers.process",
            *worker_argv(wid, model, version, slot, gpu, self._host),
        ]  # fmt: skip
        env = {**os.environ, **worker_env(self._settings_file, gpu)}
        self._log_dir.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)  # logs hold tracebacks
        with (self._log_dir / f"worker-{wid}.log").open("ab") as out:
            return subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


class ForkedWorker:
    """A forked worker, with the ``Popen`` methods the supervisor needs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(0.01)
        return code


class ForkSpawner(WorkerSpawner):
    """Starts workers by forking this (single-threaded, torch-free) supervisor."""

    def __call__(self, wid: str, model: str, version: str, slot: int, gpu: int) -> WorkerProcess:
        argv = worker_argv(wid, model, version, slot, gpu, self._host)
        env = worker_env(self._settings_file, gpu)
        self._log_dir.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)  # logs hold tracebacks
        log_path = self._log_dir / f"worker-{wid}.log"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; covered by the integration tests
            _become_worker(argv, env, log_path)
        return ForkedWorker(pid)


def _become_worker(argv: list[str], env: dict[str, str], log_path: Path) -> NoReturn:
    """In the forked child: detach, redirect, then run the worker; never returns."""
    code = 70
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        # The supervisor's Redis and pub/sub sockets must not live on in the worker.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.environ.update(env)
        from workers import process

        code = process.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # report anything, then leave the child
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class AdoptedWorker:
    """A live worker an earlier supervisor of this host started, with the ``Popen``
    methods the supervisor needs. It is not our child: its exit status cannot be read
    (``returncode`` becomes :data:`workers.reconcile.EXIT_UNKNOWN`), and psutil checks
    the process's identity (its start time) before every signal, so a reused pid is
    never signalled."""

    def __init__(self, proc: psutil.Process) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                gone = not self._proc.is_running() or self._proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                self.returncode = EXIT_UNKNOWN
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(0.01)
        return code


@dataclass(frozen=True)
class Leftover:
    """A worker of this host that an earlier supervisor started: adopted (its live
    ``process``), or found dead (None: its requests and batch chunk need answering)."""

    record: observed.WorkerRecord
    process: AdoptedWorker | None


def adopt_leftovers(
    client: redis.Redis, host: str, files: ModelFiles, timeout: float = 15.0
) -> list[Leftover]:
    """Take over what an earlier supervisor of ``host`` left; returns the adopted workers
    and, with no process, those whose record outlived them.

    A worker is adopted when its process is alive (the very process its record names:
    created before the record) and its slot lease is still this host's, or free (then
    it is claimed for this host again). A worker whose slot another host took meanwhile
    is stopped (drained, then killed after ``timeout``); records of dead workers,
    leases of this host that no adopted worker holds and model files that no adopted
    worker uses are deleted. Redis errors propagate (the caller retries).
    """
    adopted: list[Leftover] = []
    dead: list[Leftover] = []
    lease_ms = int(observed.LEASE_SECONDS * 1000)
    for record in _records_of(client, host):
        proc = _same_process(record.pid, record.started_at)
        lease = keys.slot(record.model, record.version, record.slot)
        if proc is None:
            dead.append(Leftover(record, None))
        elif record.slot >= 0 and (
            client.get(lease) == host or client.set(lease, host, nx=True, px=lease_ms)
        ):
            log.info("adopting worker %s (pid %d) of %s:%s", record.wid, proc.pid,
                     record.model, record.version)  # fmt: skip
            adopted.append(Leftover(record, AdoptedWorker(proc)))
            continue
        else:  # its slot went to another host meanwhile (or the record names none)
            log.info("stopping leftover worker %s (pid %d): its slot has moved", record.wid,
                     proc.pid)  # fmt: skip
            _stop(proc, timeout)
        observed.remove(client, record)
    held = {keys.slot(a.record.model, a.record.version, a.record.slot) for a in adopted}
    for key in client.scan_iter(match=keys.slot("*", "*", "*"), count=200):
        if key not in held and client.get(key) == host:
            client.delete(key)
    files.keep_only({(a.record.model, a.record.version) for a in adopted})
    return adopted + dead


def _records_of(client: redis.Redis, host: str) -> list[observed.WorkerRecord]:
    records = []
    for key in client.scan_iter(match=keys.worker("*"), count=200):
        record = observed.read(client, str(key).rsplit(":", 1)[-1])
        if record is not None and record.host == host:
            records.append(record)
    return records


def _same_process(pid: int, started_at: float) -> psutil.Process | None:
    """The live process ``pid`` if it is the one that wrote a record at ``started_at``."""
    if pid <= 0 or pid in (os.getpid(), os.getppid()):
        return None
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        zombie = proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return None
    # A process created after the worker wrote its record is an unrelated one that
    # reused the pid (forked workers share the supervisor's command line, so the
    # command line cannot tell).
    return None if zombie or created > started_at + 1.0 else proc


def _stop(proc: psutil.Process, timeout: float) -> None:
    with contextlib.suppress(psutil.Error):
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
