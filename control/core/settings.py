"""Settings: built once at the edge (the CLI) and passed down, never read from globals.

:class:`Settings` holds every knob of an mqserve stack. It is built from, in rising
precedence: defaults, a TorchServe ``config.properties`` file (``--ts-config``), and
command-line flags. Child processes (gunicorn apps, supervisors) receive it as a JSON
file written by the launcher, so each process parses configuration exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jproperties import Properties

from control.core.home import Home
from control.core.metrics_schema import MetricsConfigError, load_metrics_config
from control.core.observed import LEASE_GRACE

#: TorchServe's default ``max_request_size``/``max_response_size``.
DEFAULT_MAX_REQUEST_SIZE = 6553500


class SettingsError(ValueError):
    """A configuration value is unusable; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    """Every setting of one mqserve stack. Immutable; copy with :meth:`replace`."""

    home: Path = field(default_factory=lambda: Path("~/.mqserve").expanduser())
    model_store: Path | None = None
    inference_address: str = "http://127.0.0.1:8080"
    management_address: str = "http://127.0.0.1:8081"
    metrics_address: str = "http://127.0.0.1:8082"
    #: ``--models`` / ``load_models``: ``all`` or entries ``file.mar`` / ``name=file.mar``.
    load_models: tuple[str, ...] = ()
    #: Regexes a remote ``url`` must fully match. Empty (the default) refuses every
    #: remote URL: safer than TorchServe's ``file://.*|http(s)?://.*``.
    allowed_urls: tuple[str, ...] = ()
    enable_model_api: bool = False
    disable_token_authorization: bool = False
    token_expiration_min: float = 60.0
    default_workers_per_model: int = 0
    #: ``max_workers_per_model``: the most workers one model version may ask for
    #: (``initial_workers``, model-config.yaml ``minWorkers``/``maxWorkers``, scale
    #: ``min_worker``/``max_worker``); more is a 400. TorchServe has no such bound.
    max_workers_per_model: int = 64
    job_queue_size: int = 100
    #: Answer to a full queue: TorchServe's 503, or 429 with ``Retry-After`` for clients
    #: that want honest back-pressure (config key ``queue_full_status``).
    queue_full_status: int = 503
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    #: ``max_response_size``: the largest message the gRPC ports send (TorchServe's
    #: default; the HTTP ports send handlers' answers whatever their size).
    max_response_size: int = DEFAULT_MAX_REQUEST_SIZE
    #: TorchServe's gRPC ports (``control.grpc``): bind host and port of each service.
    grpc_inference_address: str = "127.0.0.1"
    grpc_inference_port: int = 7070
    grpc_management_address: str = "127.0.0.1"
    grpc_management_port: int = 7071
    #: ``grpc_{inference,management}_max_connection_age[_grace]_ms``: close a client's
    #: connection after that long (then let its calls finish for the grace); None:
    #: never (TorchServe's default).
    grpc_inference_max_connection_age_ms: int | None = None
    grpc_inference_max_connection_age_grace_ms: int | None = None
    grpc_management_max_connection_age_ms: int | None = None
    grpc_management_max_connection_age_grace_ms: int | None = None
    #: ``enable_grpc_ssl``: serve both gRPC ports over TLS with ``certificate_file`` (PEM
    #: certificate chain) and ``private_key_file`` (PEM key), TorchServe's keys; true
    #: without both is refused at start. (The HTTP ports stay plain: TLS ends in a proxy.)
    enable_grpc_ssl: bool = False
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    default_response_timeout: int = 120
    default_startup_timeout: int = 120
    unregister_model_timeout: int = 120
    default_service_handler: str = ""
    #: ``None`` means: start a private ``redis-server`` under :attr:`home`.
    redis_url: str | None = None
    #: Upper bounds for archives: download size, unpacked size and entry count.
    max_download_bytes: int = 4 * 1024**3
    max_archive_bytes: int = 16 * 1024**3
    max_archive_entries: int = 10_000
    #: Seconds a synchronous register/scale waits for a worker process to start
    #: before its model load (and ``startup_timeout``) even begins.
    worker_spawn_timeout: int = 120
    #: ``fork`` (fast: workers fork the preloaded supervisor) or ``exec`` (a fresh
    #: interpreter per worker).
    worker_start_method: str = "fork"
    #: gunicorn processes of the inference and management ports (metrics runs one), and
    #: threads per process: the metrics port's gthread threads, and the management
    #: routes' pool for blocking calls (both ASGI ports serve from one event loop).
    api_processes: int = 2
    api_threads: int = 16
    #: ``stop_grace`` (seconds): how long a stopping supervisor lets its workers finish
    #: their requests, and a stopping API server its in-flight calls (a synchronous
    #: register included), before SIGKILL. Bounds ``mqserve stop`` (``control.stack.launcher``).
    stop_grace: int = 30
    #: ``orphan_grace`` (seconds): how long a model worker goes on serving while its slot
    #: lease is gone (its supervisor died and none came back to adopt it) before it drains
    #: itself (``workers.worker.heartbeat``). Longer than a 10 s lease, so a restarted supervisor
    #: adopts its workers first.
    orphan_grace: int = int(LEASE_GRACE)
    #: ``metrics_config``: a TorchServe metrics.yaml whose ``model_metrics`` are the
    #: handler metrics the page shows (None: the default one, TorchServe 0.12's). A
    #: relative path in config.properties is taken from the working directory.
    metrics_config: Path | None = None
    #: ``model_metrics_auto_detect``: also show handler metrics the metrics.yaml does not
    #: declare, registered on first sight (TorchServe's default: off).
    model_metrics_auto_detect: bool = False
    #: ``enable_access_log``: one line per request of the inference and management ports
    #: in ``logs/access_<port>.log`` under :attr:`home` (as TorchServe writes its
    #: access log to a file). Off by default: nobody asked for that work per request.
    enable_access_log: bool = False

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # -- serialisation for child processes ------------------------------------------

    def to_json(self) -> str:
        """The settings as JSON, readable by :meth:`from_json`."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        """Inverse of :meth:`to_json`; unknown keys are an error."""
        data = json.loads(text)
        kwargs: dict[str, Any] = {}
        types = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in types:
                raise SettingsError(f"unknown setting {key!r}")
            if key in ("home", "model_store", "metrics_config", "certificate_file",
                       "private_key_file"):  # fmt: skip
                value = None if value is None else Path(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    # -- derived values --------------------------------------------------------------

    def bind(self, which: str) -> tuple[str, int]:
        """``(host, port)`` of ``which`` in {``inference``, ``management``, ``metrics``}."""
        address = getattr(self, f"{which}_address")
        return parse_address(address)

    def grpc_bind(self, which: str) -> tuple[str, int]:
        """``(host, port)`` of the gRPC service ``which`` (``inference``, ``management``)."""
        return getattr(self, f"grpc_{which}_address"), getattr(self, f"grpc_{which}_port")

    @property
    def token_auth(self) -> bool:
        """True when requests must carry a bearer key (TorchServe's default since 0.11.1)."""
        return not self.disable_token_authorization

    @property
    def key_file(self) -> Path:
        """Where the plaintext keys are written for the operator (mode 0600)."""
        return Home(self.home).key_file


def parse_address(address: str) -> tuple[str, int]:
    """Split TorchServe's ``http://host:port`` address form into ``(host, port)``."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme not in ("http", "") or not parts.hostname or parts.port is None:
        raise SettingsError(
            f"address {address!r} must look like http://127.0.0.1:8081 (https and unix "
            "sockets are not supported; terminate TLS in a proxy)"
        )
    return parts.hostname, parts.port


# -- the settings file of a child process --------------------------------------------

#: The environment variable naming the JSON settings file (:meth:`Settings.to_json`)
#: that the launcher and the supervisor write for their children (API servers, model
#: workers). Here, not in the WSGI wiring, so that a model worker reads its settings
#: without importing any HTTP framework.
SETTINGS_ENV = "MQSERVE_SETTINGS"


def settings_from_env() -> Settings:
    """The settings file named in ``$MQSERVE_SETTINGS``.

    Raises RuntimeError when the variable is unset (the process was not started by
    ``mqserve``), OSError when the file cannot be read, SettingsError on unknown keys.
    """
    path = os.environ.get(SETTINGS_ENV)
    if not path:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start apps through `mqserve start`")
    return Settings.from_json(Path(path).read_text())


# -- config.properties --------------------------------------------------------------

_INT_KEYS = {
    "queue_full_status",
    "default_workers_per_model",
    "max_workers_per_model",
    "job_queue_size",
    "max_request_size",
    "default_response_timeout",
    "default_startup_timeout",
    "unregister_model_timeout",
    "stop_grace",
    "orphan_grace",
    "api_processes",
    "api_threads",
    "max_response_size",
    "grpc_inference_port",
    "grpc_management_port",
    "grpc_inference_max_connection_age_ms",
    "grpc_inference_max_connection_age_grace_ms",
    "grpc_management_max_connection_age_ms",
    "grpc_management_max_connection_age_grace_ms",
}
_STR_KEYS = {
    "worker_start_method",
    "inference_address",
    "management_address",
    "metrics_address",
    "default_service_handler",
    "grpc_inference_address",
    "grpc_management_address",
}
_BOOL_KEYS = {
    "enable_model_api",
    "disable_token_authorization",
    "model_metrics_auto_detect",
    "enable_access_log",
    "enable_grpc_ssl",
}
_ENV_REF = re.compile(r"\$\$([A-Za-z_][A-Za-z0-9_]*)\$\$")


def read_properties(path: Path) -> dict[str, str]:
    """Parse a Java properties file, expanding TorchServe's ``$$VAR$$`` references."""
    props = Properties()
    try:
        with path.open("rb") as fh:
            props.load(fh, "utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
    out: dict[str, str] = {}
    for key in props:
        value = props[key].data
        out[key] = _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), value)
    return out


def apply_properties(settings: Settings, props: dict[str, str]) -> Settings:
    """Overlay the TorchServe ``config.properties`` keys mqserve understands.

    Unknown keys are ignored, as TorchServe ignores keys it does not use; invalid
    values of known keys are an error (a server must not start half-configured).
    """
    changes: dict[str, Any] = {}
    for key, raw in props.items():
        value = raw.strip()
        if key in _INT_KEYS:
            try:
                changes[key] = int(value)
            except ValueError as exc:
                raise SettingsError(f"{key} must be an integer, got {value!r}") from exc
        elif key in _BOOL_KEYS:
            changes[key] = value.lower() == "true"
        elif key in _STR_KEYS:
            changes[key] = value
        elif key == "token_expiration_min":
            try:
                changes[key] = float(value)
            except ValueError as exc:
                raise SettingsError(f"{key} must be a number, got {value!r}") from exc
        elif key in ("metrics_config", "certificate_file", "private_key_file"):
            changes[key] = Path(value).expanduser().absolute()
        elif key == "model_store":
            changes[key] = Path(value).expanduser()
        elif key == "load_models" or key == "allowed_urls":
            changes[key] = split_list(value)
    result = settings.replace(**changes)
    validate(result)
    return result


def split_list(value: str) -> tuple[str, ...]:
    """Split a TorchServe comma-separated list, dropping empty entries."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def validate(settings: Settings) -> None:
    """Raise :class:`SettingsError` for values no server could run with."""
    for which in ("inference", "management", "metrics"):
        settings.bind(which)
    for pattern in settings.allowed_urls:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SettingsError(f"allowed_urls entry {pattern!r} is not a regex: {exc}") from exc
    if settings.max_request_size <= 0:
        raise SettingsError("max_request_size must be positive")
    _validate_grpc(settings)
    if settings.job_queue_size <= 0:
        raise SettingsError("job_queue_size must be positive")
    if settings.max_workers_per_model <= 0:
        raise SettingsError("max_workers_per_model must be positive")
    if settings.default_workers_per_model > settings.max_workers_per_model:
        raise SettingsError("default_workers_per_model cannot be more than max_workers_per_model")
    if settings.queue_full_status not in (429, 503):
        raise SettingsError("queue_full_status must be 503 (TorchServe) or 429")
    if settings.worker_start_method not in ("fork", "exec"):
        raise SettingsError("worker_start_method must be fork or exec")
    if settings.metrics_config is not None:
        try:
            load_metrics_config(settings.metrics_config)
        except MetricsConfigError as exc:
            raise SettingsError(f"metrics_config: {exc}") from exc


def _validate_grpc(settings: Settings) -> None:
    """The gRPC keys: message limit, ports in range, bare hosts, ages positive, and with
    TLS (:attr:`Settings.enable_grpc_ssl`) a readable certificate and key."""
    if settings.max_response_size <= 0:
        raise SettingsError("max_response_size must be positive")
    if settings.enable_grpc_ssl:
        for key in ("certificate_file", "private_key_file"):
            path = getattr(settings, key)
            if path is None:
                raise SettingsError(f"enable_grpc_ssl=true needs {key} (a PEM file)")
            if not os.access(path, os.R_OK) or not Path(path).is_file():
                raise SettingsError(f"{key} {path} is not a readable file")
    for which in ("inference", "management"):
        host, port = settings.grpc_bind(which)
        if not 0 < port < 65536:
            raise SettingsError(f"grpc_{which}_port must be between 1 and 65535, got {port}")
        if not host or "://" in host or "/" in host:
            raise SettingsError(
                f"grpc_{which}_address must be a bare host such as 127.0.0.1, got {host!r}"
            )
        for suffix in ("max_connection_age_ms", "max_connection_age_grace_ms"):
            value = getattr(settings, f"grpc_{which}_{suffix}")
            if value is not None and value <= 0:
                raise SettingsError(f"grpc_{which}_{suffix} must be positive")
