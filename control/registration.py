"""From a register request to a :class:`ModelSpec`: TorchServe's precedence rules.

Pure functions, no I/O. The rules follow TorchServe's code, not its docs
(``torchserve.md`` §1.4, §1.13, §3.6):

* batch size and delay: REST value if given, else model-config.yaml if > 0, else 1/100;
* response and startup timeouts: if the archive has a model-config.yaml, its value
  (120 when the key is absent) and the REST value is ignored; else REST, else the
  server default;
* workers: yaml ``minWorkers`` > 0 and ``maxWorkers`` >= it win over ``initial_workers``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from control.errors import BadRequestException, InvalidModelException
from control.params import Params
from control.settings import Settings
from control.spec import VALID_RUNTIMES, ModelSpec, check_model_name, check_model_version

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120


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
    """Validate what TorchServe validates (url present, runtime name) and nothing more."""
    url = params.text("url")
    if url is None:
        raise BadRequestException("Parameter url is required.")
    runtime = params.text("runtime")
    if runtime is not None and runtime not in VALID_RUNTIMES:
        raise BadRequestException(f"Invalid RuntimeType value: {runtime}")
    response_timeout = params.integer("response_timeout", -1)
    startup_timeout = params.integer("startup_timeout", -1)
    return RegisterRequest(
        url=url,
        model_name=params.text("model_name") or None,
        handler=params.text("handler") or None,
        runtime=runtime,
        batch_size=_given(params, "batch_size"),
        max_batch_delay=_given(params, "max_batch_delay"),
        initial_workers=max(
            params.integer("initial_workers", settings.default_workers_per_model), 0
        ),
        synchronous=params.boolean("synchronous", True),
        response_timeout=None if response_timeout == -1 else response_timeout,
        startup_timeout=None if startup_timeout < 0 else startup_timeout,
    )


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
    yaml_min, yaml_max = yaml.integer("minWorkers"), yaml.integer("maxWorkers")
    if yaml_min is not None and yaml_min > 0 and yaml_max is not None and yaml_max >= yaml_min:
        min_workers, max_workers = yaml_min, yaml_max

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

    def integer(self, key: str) -> int | None:
        value = self._data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            log.warning("model-config.yaml: %s must be an integer; ignored", key)
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
