"""From a register request to a :class:`ModelSpec`: TorchServe's precedence rules.

Pure functions, no I/O. The rules follow TorchServe's code, not its docs
(``docs/torchserve-compat.md#parameter-precedence``, and ``#register`` and
``#model-configyaml`` there):

* batch size and delay: REST value if given, else model-config.yaml if > 0, else 1/100;
* response and startup timeouts: if the archive has a model-config.yaml, its value
  (120 when the key is absent) and the REST value is ignored; else REST, else the
  server default;
* workers: yaml ``minWorkers`` > 0 and ``maxWorkers`` >= it win over ``initial_workers``.

Bounds beyond TorchServe (each a 400, before any I/O where the request alone decides):

* ``initial_workers``, and the yaml's ``minWorkers``/``maxWorkers`` when they win, at most
  ``Settings.max_workers_per_model``;
* ``response_timeout``: positive, or TorchServe's ``-1`` (the default); ``startup_timeout``:
  ``0`` (fail at once, as in TorchServe), positive, or ``-1``; both at most ``2**31 - 1``
  (Java's ``int``);
* ``url``: at most :data:`MAX_URL_LENGTH` characters (Netty's longest request line, so a
  JSON body cannot carry a longer url than a query string can).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from control.core.errors import BadRequestException, InvalidModelException
from control.core.settings import Settings
from control.core.spec import VALID_RUNTIMES, ModelSpec, check_model_name, check_model_version
from control.http.params import Params

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120
#: Longest ``url`` accepted: TorchServe's (Netty's) longest initial request line.
MAX_URL_LENGTH = 4096
#: Java's largest ``int``: TorchServe's limit for every timeout and yaml number.
_JAVA_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class RegisterRequest:
    """The parameters of ``POST /models`` after TorchServe's parsing rules."""

    url: str
    model_name: str | None
    handler: str | None
    runtime: str | None
    batch_size: int | None
    max_batch_delay: int | None
    initial_workers: int
    synchronous: bool
    response_timeout: int | None
    startup_timeout: int | None


def parse_register(params: Params, settings: Settings) -> RegisterRequest:
    """Validate what TorchServe validates (url present, runtime name) and the bounds of
    the module docstring; raise a 400 :class:`BadRequestException` for any violation."""
    url = params.text("url")
    if url is None:
        raise BadRequestException("Parameter url is required.")
    if len(url) > MAX_URL_LENGTH:
        raise BadRequestException(f"Parameter url is longer than {MAX_URL_LENGTH} characters.")
    runtime = params.text("runtime")
    if runtime is not None and runtime not in VALID_RUNTIMES:
        raise BadRequestException(f"Invalid RuntimeType value: {runtime}")
    response_timeout = _timeout(params, "response_timeout", allow_zero=False)
    startup_timeout = _timeout(params, "startup_timeout", allow_zero=True)
    initial_workers = params.count(
        "initial_workers", settings.default_workers_per_model, settings.max_workers_per_model
    )
    return RegisterRequest(
        url=url,
        model_name=params.text("model_name") or None,
        handler=params.text("handler") or None,
        runtime=runtime,
        batch_size=_given(params, "batch_size"),
        max_batch_delay=_given(params, "max_batch_delay"),
        initial_workers=max(initial_workers, 0),
        synchronous=params.boolean("synchronous", True),
        response_timeout=response_timeout,
        startup_timeout=startup_timeout,
    )


def _timeout(params: Params, name: str, allow_zero: bool) -> int | None:
    """A timeout in seconds; ``None`` for absent, not a number, or ``-1`` (TorchServe's
    "use the default"). Other values below the allowed minimum, or above Java's ``int``,
    are a 400: a timeout of -5 s or 0 s would fail every request of the model."""
    value = params.whole(name)
    if value is None or value == -1:
        return None
    lowest = 0 if allow_zero else 1
    if not lowest <= value <= _JAVA_INT_MAX:
        allowed = "0 or more" if allow_zero else "positive"
        raise BadRequestException(
            f"{name} must be {allowed} and at most {_JAVA_INT_MAX}, or -1 for the default."
        )
    return value


def _given(params: Params, name: str) -> int | None:
    sentinel = -(2**40)
    value = params.integer(name, sentinel)
    return None if value == sentinel else value


@dataclass(frozen=True)
class Plan:
    """A spec to register and the desired worker counts to start it with."""

    spec: ModelSpec
    min_workers: int
    max_workers: int


def build_spec(
    req: RegisterRequest,
    archive: str,
    downloaded: bool,
    manifest: dict[str, Any],
    model_config: dict[str, Any],
    settings: Settings,
    loaded_at_startup: bool = False,
) -> Plan:
    """Combine request, manifest, model-config.yaml and server settings."""
    model = manifest.get("model") or {}
    name = req.model_name or model.get("modelName")
    if not name:
        raise InvalidModelException("Model name is not defined.")
    check_model_name(name)
    version = check_model_version(str(model.get("modelVersion") or "1.0"))
    runtime = req.runtime or manifest.get("runtime") or "python"
    if runtime not in VALID_RUNTIMES:
        raise InvalidModelException("Runtime is not defined or invalid.")
    handler = req.handler or model.get("handler") or settings.default_service_handler
    yaml = _YamlConfig(model_config)
    has_yaml = bool(model.get("configFile"))

    batch_size = req.batch_size if req.batch_size is not None else yaml.positive("batchSize")
    delay = (
        req.max_batch_delay if req.max_batch_delay is not None else yaml.positive("maxBatchDelay")
    )
    if has_yaml:
        response_timeout = yaml.positive("responseTimeout") or DEFAULT_TIMEOUT
        startup_timeout = yaml.positive("startupTimeout") or DEFAULT_TIMEOUT
    else:
        response_timeout = _or(req.response_timeout, settings.default_response_timeout)
        startup_timeout = _or(req.startup_timeout, settings.default_startup_timeout)

    min_workers = max_workers = req.initial_workers
    # Unbounded reads: a worker count too large is refused below, not ignored.
    yaml_min = yaml.integer("minWorkers", java_range=False)
    yaml_max = yaml.integer("maxWorkers", java_range=False)
    if yaml_min is not None and yaml_min > 0 and yaml_max is not None and yaml_max >= yaml_min:
        min_workers, max_workers = yaml_min, yaml_max
        if max_workers > settings.max_workers_per_model:  # minWorkers <= maxWorkers here
            key = "minWorkers" if min_workers > settings.max_workers_per_model else "maxWorkers"
            raise InvalidModelException(
                f"model-config.yaml {key} cannot be more than {settings.max_workers_per_model}."
            )

    spec = ModelSpec(
        model_name=name,
        version=version,
        url=req.url,
        archive=archive,
        downloaded=downloaded,
        handler=handler,
        runtime=runtime,
        batch_size=max(batch_size or 1, 1),
        max_batch_delay=delay if delay is not None and delay >= 0 else 100,
        response_timeout=response_timeout,
        startup_timeout=startup_timeout,
        max_retry_timeout=yaml.nonneg("maxRetryTimeoutInSec", 300),
        client_timeout_ms=yaml.nonneg("clientTimeoutInMills", 0),
        job_queue_size=yaml.positive("jobQueueSize") or settings.job_queue_size,
        device_type=yaml.device_type(),
        device_ids=yaml.device_ids(),
        parallel_type=yaml.choice("parallelType", ("pp", "tp", "pptp", "custom")),
        parallel_level=yaml.nonneg("parallelLevel", 0),
        continuous_batching=yaml.flag("continuousBatching"),
        use_job_ticket=yaml.flag("useJobTicket"),
        use_venv=yaml.flag("useVenv"),
        stateful=yaml.flag("sequenceBatching"),
        sequence_max_idle_ms=yaml.nonneg("sequenceMaxIdleMSec", 0),
        sequence_timeout_ms=yaml.nonneg("sequenceTimeoutMSec", 0),
        max_num_sequence=yaml.nonneg("maxNumSequence", 0),
        max_sequence_job_queue_size=yaml.nonneg("maxSequenceJobQueueSize", 0),
        loaded_at_startup=loaded_at_startup,
        manifest=manifest,
        model_config=model_config,
    )
    return Plan(spec, min_workers, max_workers)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


class _YamlConfig:
    """Typed reads of model-config.yaml; a value of the wrong type is logged and ignored."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def integer(self, key: str, java_range: bool = True) -> int | None:
        """The integer at ``key``; ``None`` (logged) for another type, or, with
        ``java_range``, for a value outside Java's ``int`` (TorchServe's fields)."""
        value = self._data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            log.warning("model-config.yaml: %s must be an integer; ignored", key)
            return None
        if java_range and not -_JAVA_INT_MAX - 1 <= value <= _JAVA_INT_MAX:
            log.warning("model-config.yaml: %s is out of range; ignored", key)
            return None
        return value

    def positive(self, key: str) -> int | None:
        value = self.integer(key)
        return value if value is not None and value > 0 else None

    def nonneg(self, key: str, default: int) -> int:
        value = self.integer(key)
        return value if value is not None and value >= 0 else default

    def flag(self, key: str) -> bool:
        value = self._data.get(key)
        return value if isinstance(value, bool) else False

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self._data.get(key)
        return value if isinstance(value, str) and value in allowed else ""

    def device_type(self) -> str:
        """What model-config asked for: ``"cpu"``, ``"gpu"``, or ``""`` (not said).

        The registry records the request, not a decision: only each host's supervisor
        knows its GPUs, and ``""`` means "a GPU where the host has any", as in
        TorchServe. TorchServe's parsing: case-insensitive; any other string, or a value
        that is not a string, counts as not said.
        """
        value = self._data.get("deviceType")
        if value is None:
            return ""
        if not isinstance(value, str):
            log.warning("model-config.yaml: deviceType must be cpu or gpu; ignored")
            return ""
        lowered = value.lower()
        if lowered in ("cpu", "gpu"):
            return lowered
        log.warning("model-config.yaml: invalid deviceType %r; ignored", value)
        return ""

    def device_ids(self) -> tuple[int, ...] | None:
        value = self._data.get("deviceIds")
        if not isinstance(value, list) or not value:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            log.warning("model-config.yaml: deviceIds must be a list of GPU ids; ignored")
            return None
        return tuple(value)
