"""Running a supervisor: ``mqserve supervisor`` and the supervisor child of a stack.

The supervisor runs in the foreground until SIGTERM or SIGINT, then drains its
workers. It waits for Redis at start-up and rides out Redis outages later
(``workers.outage``): only a signal stops it. ``--check`` is the health probe for
containers: it exits 0 only when this host's supervisor is alive in Redis.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import redis

from control.core import keys
from control.core.devices import visible_gpus
from control.core.home import write_private
from control.core.redis_io import connect, redis_client
from control.core.settings import Settings
from workers.model_files import ModelFiles
from workers.outage import until_available
from workers.supervisor.loop import Supervisor
from workers.supervisor.spawn import ForkSpawner, WorkerSpawner, adopt_leftovers

log = logging.getLogger(__name__)

#: How long a stopping supervisor lets its workers finish their requests with default
#: settings (``stop_grace``, the one knob): then it SIGKILLs the ones still running, so
#: a stuck handler never holds up a stop.
SHUTDOWN_TIMEOUT = float(Settings().stop_grace)


def default_host_name() -> str:
    """This host's name in Redis: unique per supervisor, stable across restarts."""
    return socket.gethostname()


def run_supervisor(settings: Settings, host: str, gpus: tuple[int, ...] | None = None) -> None:
    """Reconcile this host's workers until SIGTERM/SIGINT, then drain them."""
    if settings.redis_url is None:
        raise ValueError("a supervisor needs settings.redis_url")
    settings_file = settings_path(settings.home, host)
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    write_private(settings_file, settings.to_json())
    clients = connect(settings.redis_url)
    client = clients.text
    devices = visible_gpus() if gpus is None else gpus
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # Redis may not be up yet (or restarting): wait for it, with back-off, rather than
    # exit; a stop signal meanwhile ends the wait (and the supervisor, with no workers).
    files = ModelFiles.of(settings.home, host)
    left = until_available(
        lambda: adopt_leftovers(client, host, files), stop, "supervisor start-up", log
    )
    if left is None:
        log.info("supervisor %s stopped before Redis was reachable", host)
        return
    alive = sum(1 for leftover in left if leftover.process is not None)
    if left:
        log.info("adopted %d live worker(s) of %d left by an earlier supervisor of %s",
                 alive, len(left), host)  # fmt: skip
    # Fork by default: the supervisor has imported what a worker needs, so a worker
    # starts in milliseconds. Importing workers.worker.process here is that preloading.
    import workers.worker.process  # noqa: F401

    kind = ForkSpawner if settings.worker_start_method == "fork" else WorkerSpawner
    spawner = kind(settings_file, host, settings.home / "logs")
    supervisor = Supervisor(settings, client, host, spawner, devices, frames=clients.frames)
    supervisor.adopt(left)
    log.info("supervisor %s running with GPUs %s", host, list(devices) or "none")
    try:
        supervisor.run(stop)
    finally:
        supervisor.shutdown(float(settings.stop_grace))
        log.info("supervisor %s stopped", host)


def check(redis_url: str, host: str) -> bool:
    """True when the supervisor of ``host`` has announced itself recently."""
    try:
        return bool(redis_client(redis_url).exists(keys.host(host)))
    except redis.RedisError:
        return False


def settings_path(home: Path, host: str) -> Path:
    """Where :func:`run_supervisor` writes the settings its workers read."""
    return home / "run" / f"worker-settings-{host}.json"
