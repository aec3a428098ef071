"""Management operations: register, scale, set-default, unregister, and the documents
of describe and list.

Plain Python over the registry, the model store and the worker records; the HTTP
resources only parse requests and render what these methods return. Each method
returns ``(status, message)`` for status-type answers or a JSON-ready document. The
methods block (Redis calls, waits for workers): the ASGI routes run them in a thread.
Describe and list read Redis in one round trip each, asynchronously
(``control.management.reads``), and build their bodies with :func:`describe_version`
and :func:`list_body` here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from control.core import devices
from control.core.dispatch import refuse_queued
from control.core.errors import (
    BadRequestException,
    InternalServerException,
    ModelServerError,
    RequestTimeoutException,
)
from control.core.observed import WorkerRecord, WorkerState, serving_count, workers_of
from control.core.registry import Registry, VersionRecord
from control.core.settings import Settings
from control.core.timestamps import iso_time
from control.http.params import Params
from control.management.registration import RegisterRequest, build_spec, parse_register
from control.management.waiting import WorkerWaiter

log = logging.getLogger(__name__)

MAX_PAGE = 100


class ArchiveSource(Protocol):
    """What the service needs from the model store (``control.archives.store.ModelStore``)."""

    def resolve(self, url: str) -> Any: ...

    def remove(self, archive: str) -> None: ...


class ManagementService:
    """TorchServe's management semantics over Redis. Thread-safe; holds no request state."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        store: ArchiveSource,
        clock: Callable[[], float] = time.time,
        waiter: WorkerWaiter | None = None,
        frames: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self._r = client
        #: A bytes client of the same Redis, to answer the requests queued for a version
        #: being unregistered; None (the launcher's startup registrations): not answered.
        self._frames = frames
        self.registry = Registry(client, clock)
        self._store = store
        self._clock = clock
        self._waiter = waiter or WorkerWaiter(client)

    # -- register ------------------------------------------------------------------------

    def register(self, params: Params, loaded_at_startup: bool = False) -> tuple[int, str]:
        """``POST /models``: resolve the archive, record the version, start workers."""
        req = parse_register(params, self.settings)
        info = self._store.resolve(req.url)
        try:
            plan = build_spec(
                req,
                info.archive,
                info.downloaded,
                info.manifest,
                info.model_config,
                self.settings,
                loaded_at_startup,
            )
            self.registry.register(plan.spec, plan.min_workers, plan.max_workers)
        except ModelServerError:
            if info.downloaded:  # nothing of this request may stay behind
                self._store.remove(info.archive)
            raise
        return self._start_registered(
            req, plan.spec.model_name, plan.spec.version, plan.min_workers
        )

    def _start_registered(
        self, req: RegisterRequest, name: str, ver: str, workers: int
    ) -> tuple[int, str]:
        if workers <= 0:
            return 200, (
                f'Model "{name}" Version: {ver} registered with 0 initial workers. '
                "Use scale workers API to add workers for the model."
            )
        if not req.synchronous:
            return 202, "Processing worker updates..."
        since = self._clock()
        record = self.registry.get(name, ver)
        outcome = self._waiter.until_ready(name, ver, workers, since, self._load_budget(record))
        if outcome.ok:
            return 200, f'Model "{name}" Version: {ver} registered with {workers} initial workers'
        log.warning("rolling back %s:%s, workers failed: %s", name, ver, outcome.reason)
        self._rollback(record)
        raise InternalServerException(
            f"Failed to start workers for model {name} version: {ver}", outcome.status
        )

    def _refuse_queued(self, name: str, version: str) -> None:
        """Answer the requests queued for a version being unregistered: 503 at once."""
        if self._frames is not None:
            refused = refuse_queued(self._frames, name, version)
            if refused:
                log.info(
                    "answered %d queued request(s) of %s:%s: unregistered", refused, name, version
                )

    def _rollback(self, record: VersionRecord) -> None:
        spec = record.spec
        try:
            self.registry.prepare_unregister(spec.model_name, spec.version)
            self._waiter.until_at_most(
                spec.model_name, spec.version, 0, self.settings.unregister_model_timeout
            )
            self.registry.delete(spec.model_name, spec.version)
        except ModelServerError as exc:  # e.g. became default with other versions
            log.warning("rollback of %s:%s incomplete: %s", spec.model_name, spec.version, exc)
            return
        if spec.downloaded:
            self._store.remove(spec.archive)

    def _load_budget(self, record: VersionRecord) -> float:
        return float(self.settings.worker_spawn_timeout + record.spec.startup_timeout)

    # -- scale ---------------------------------------------------------------------------

    def scale(self, name: str, version: str | None, params: Params) -> tuple[int, str]:
        """``PUT /models/{name}[/{version}]``: set desired workers, optionally wait."""
        # Above max_workers_per_model is a 400 (``Params.count``), checked before any write.
        most = self.settings.max_workers_per_model
        min_workers = params.count("min_worker", 1, most)
        max_workers = params.count("max_worker", min_workers, most)
        synchronous = params.boolean("synchronous", False)
        if version is None:
            version = params.text("model_version") or None
        if max_workers < min_workers:
            raise BadRequestException("max_worker cannot be less than min_worker.")
        if min_workers < 0:
            raise BadRequestException("min_worker cannot be negative.")
        before = self._clock()
        ver = self.registry.scale(name, version, min_workers, max_workers)
        if not synchronous:
            return 202, "Processing worker updates..."
        record = self.registry.get(name, ver)
        if serving_count(workers_of(self._r, name, ver)) > max_workers:
            if not self._waiter.until_at_most(
                name, ver, max_workers, self.settings.unregister_model_timeout
            ):
                raise RequestTimeoutException(f"Timed out while cleaning resources: {name}")
        else:
            outcome = self._waiter.until_ready(
                name, ver, min_workers, before, self._load_budget(record)
            )
            if not outcome.ok:
                raise InternalServerException(
                    f"Failed to start workers for model {name} version: {version or 'null'}",
                    outcome.status,
                )
        suffix = f", version: {version}" if version is not None else ""
        return 200, f"Workers scaled to {min_workers} for model: {name}{suffix}"

    # -- set-default, unregister -----------------------------------------------------------

    def set_default(self, name: str, version: str) -> tuple[int, str]:
        """``PUT /models/{name}/{version}/set-default``."""
        self.registry.set_default(name, version)
        return 200, f'Default version successfully updated for model "{name}" to "{version}"'

    def unregister(self, name: str, version: str | None) -> tuple[int, str]:
        """``DELETE /models/{name}[/{version}]``: drain workers, then forget the version."""
        record = self.registry.prepare_unregister(name, version)
        spec = record.spec
        self._refuse_queued(name, spec.version)
        drained = self._waiter.until_at_most(
            name, spec.version, 0, self.settings.unregister_model_timeout
        )
        if not drained:
            raise RequestTimeoutException(f"Timed out while cleaning resources: {name}")
        self._refuse_queued(name, spec.version)  # any queued while the workers stopped
        self.registry.delete(name, spec.version)
        if spec.downloaded:
            self._store.remove(spec.archive)
        return 200, f'Model "{name}" unregistered'

    # -- reads -----------------------------------------------------------------------------

    def kserve_ready(self, name: str) -> dict[str, Any]:
        """``GET /v1/models/{name}`` on the management port: ready iff a worker of the
        default version can take requests (the rule dispatch uses)."""
        record = self.registry.get(name)
        serving = serving_count(workers_of(self._r, name, record.spec.version))
        return {"name": name, "ready": serving > 0}


def page_bounds(params: Params) -> tuple[int, int]:
    """``(offset, limit)`` of ``GET /models``: TorchServe's ``limit`` (blank, negative or
    above 100 is 100) and ``next_page_token`` (an offset, negative is 0)."""
    limit = params.integer("limit", MAX_PAGE)
    if limit > MAX_PAGE or limit < 0:
        limit = MAX_PAGE
    return max(params.integer("next_page_token", 0), 0), limit


def list_body(offset: int, limit: int, page: list[tuple[str, str]], total: int) -> dict[str, Any]:
    """``GET /models``'s body for ``page`` (``(name, default version's url)``) of ``total``."""
    body: dict[str, Any] = {}
    if offset + limit <= total:
        body["nextPageToken"] = str(offset + limit)
    body["models"] = [{"modelName": n, "modelUrl": u} for n, u in page]
    return body


def describe_version(
    record: VersionRecord, workers: list[WorkerRecord], pending: int, gpus_exist: bool
) -> dict[str, Any]:
    """Describe's document for one version: ``workers`` its live workers (by id),
    ``pending`` its online queue's length, ``gpus_exist`` whether a live supervisor
    announced GPUs (read only when the model's ``device_type`` is not ``cpu``)."""
    spec = record.spec
    doc: dict[str, Any] = {
        "modelName": spec.model_name,
        "modelVersion": spec.version,
        "modelUrl": spec.url,
        "runtime": spec.runtime,
        "minWorkers": record.min_workers,
        "maxWorkers": record.max_workers,
        "batchSize": spec.batch_size,
        "maxBatchDelay": spec.max_batch_delay,
        "responseTimeout": spec.response_timeout,
        "startupTimeout": spec.startup_timeout,
        "maxRetryTimeoutInSec": spec.max_retry_timeout,
        "clientTimeoutInMills": spec.client_timeout_ms,
        "parallelType": spec.parallel_type,
        "parallelLevel": spec.parallel_level,
        "deviceType": devices.described_device_type(spec.device_type, gpus_exist),
    }
    if spec.device_ids is not None:
        doc["deviceIds"] = list(spec.device_ids)
    doc.update(
        {
            "continuousBatching": spec.continuous_batching,
            "useJobTicket": spec.use_job_ticket,
            "useVenv": spec.use_venv,
            "stateful": spec.stateful,
            "sequenceMaxIdleMSec": spec.sequence_max_idle_ms,
            "sequenceTimeoutMSec": spec.sequence_timeout_ms,
            "maxNumSequence": spec.max_num_sequence,
            "maxSequenceJobQueueSize": spec.max_sequence_job_queue_size,
            "loadedAtStartup": spec.loaded_at_startup,
            # Draining workers have left the model's list, as scaled-down ones do in
            # TorchServe: they finish their last request and take no new ones.
            "workers": [describe_worker(w) for w in workers if w.state is not WorkerState.DRAINING],
            # The online queue, which job_queue_size bounds (batch jobs have their own).
            "jobQueueStatus": {
                "remainingCapacity": max(spec.job_queue_size - pending, 0),
                "pendingRequests": pending,
            },
        }
    )
    return doc


def describe_worker(record: WorkerRecord) -> dict[str, Any]:
    """TorchServe's worker entry: ``status`` is READY only when serving, else UNLOADING.

    ``gpu`` is true when the worker holds a GPU; ``gpuUsage`` is ``N/A`` on CPU, else
    the host's latest nvidia-smi sample in TorchServe's text, or TorchServe's ``failed
    to obtained gpu usage`` when there is none (``control.core.devices``).
    """
    doc: dict[str, Any] = {
        "id": record.wid,
        "startTime": iso_time(record.started_at),
        "status": "READY" if record.state.serving else "UNLOADING",
        "memoryUsage": record.memory,
        "pid": record.pid,
        "gpu": record.gpu >= 0,
        # TorchServe's text for the worker's GPU, sampled by its host's supervisor.
        "gpuUsage": "N/A" if record.gpu < 0 else record.gpu_usage or devices.USAGE_UNAVAILABLE,
    }
    if record.state is WorkerState.FAILED and record.reason:
        # Beyond TorchServe: why a worker is down, without reading logs. Clients that
        # know only TorchServe's fields ignore it (it is absent while workers are fine).
        doc["lastError"] = record.reason
    return doc
