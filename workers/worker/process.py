"""One model worker process: load one model version, then consume its queue with Celery.

Started by the supervisor as ``python -m workers.worker.process --wid ... --model ...``. The
model is loaded *before* the Celery consumer starts (``-P solo``: no fork, so CUDA is
safe, and ``worker_ready`` really means "loaded and consuming"). The process reports
LOADING, READY, BUSY, DRAINING or FAILED (with the reason) to its record in Redis.

Exit codes: 0 after a drain, :data:`EXIT_LOAD_FAILED` when the model did not load,
:data:`EXIT_OUT_OF_MEMORY` when it did not fit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

from control.archives.store import ModelStore, model_store
from control.core import keys
from control.core.celery_app import make_celery
from control.core.errors import ModelServerError
from control.core.home import Home, write_pid
from control.core.metrics_schema import MetricsConfig, MetricsConfigError
from control.core.observed import WorkerRecord, WorkerState
from control.core.observed import now as wall
from control.core.redis_io import Clients, connect
from control.core.registry import Registry, VersionRecord
from control.core.settings import Settings, settings_from_env
from control.core.spec import ModelSpec
from control.metrics.recorder import Flusher, MetricsRecorder, ModelMetrics
from workers.handling.compat import install_compat_path
from workers.handling.loader import LoadError, enter_model_dir, load_handler
from workers.handling.metrics import config_at
from workers.handling.service import LoadedModel
from workers.model_files import ModelFiles, registration_tag
from workers.worker import broker
from workers.worker.heartbeat import LeaseWatch, Reporter
from workers.worker.serving import Batcher, ModelRunner, OnlineLoop, block_slack
from workers.worker.tasks import register_tasks

log = logging.getLogger("mqserve.worker")

EXIT_LOAD_FAILED = 3
EXIT_OUT_OF_MEMORY = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mqserve-worker")
    for name in ("--wid", "--model", "--version", "--host"):
        parser.add_argument(name, required=True)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--gpu", type=int, default=-1)
    return parser.parse_args(argv)


def load(
    settings: Settings,
    store: ModelStore,
    args: argparse.Namespace,
    record: VersionRecord,
    metrics_config: MetricsConfig | None = None,
) -> LoadedModel:
    """Unpack the archive of ``record`` (``args.model``/``args.version``) and initialise
    its handler.

    The handler's ``context.metrics`` has ``metrics_config``'s model metrics declared.
    The model directory becomes the process's cwd first (:func:`enter_model_dir`).
    """
    root = unpack_model(settings, store, args.host, record)
    enter_model_dir(root)
    install_compat_path()
    # The worker sees only its own GPU, as device 0 (CUDA_VISIBLE_DEVICES).
    return load_handler(root, record.spec, 0 if args.gpu >= 0 else None, metrics_config)


def unpack_model(settings: Settings, store: ModelStore, host: str, record: VersionRecord) -> Path:
    """The model directory of ``record`` for ``host``'s workers; a :class:`LoadError`
    (``cannot unpack the model archive: ...``) when the archive cannot be unpacked.

    The archive is unpacked once per host and registration into this stack's home
    (``workers.model_files.ModelFiles``) and shared with the host's other workers of the
    version; the supervisor deletes it after the last of them exits.
    """
    files = ModelFiles.of(settings.home, host)
    spec = record.spec

    def extract(dest: Path) -> Path:
        return store.extract(spec.archive, dest)

    try:
        return files.unpack(spec.model_name, spec.version, registration_tag(record), extract)
    except ModelServerError as exc:
        raise LoadError(f"cannot unpack the model archive: {exc.message}") from exc
    except OSError as exc:  # e.g. the home's disk is full
        raise LoadError(f"cannot unpack the model archive: {exc.strerror or exc}") from exc


def read_metrics_config(settings: Settings) -> MetricsConfig:
    """The stack's metrics.yaml (``metrics_config``); a LoadError when it is unusable here."""
    try:
        return config_at(settings.metrics_config)
    except MetricsConfigError as exc:
        raise LoadError(str(exc)) from exc


def _wire_signals(reporter: Reporter, online: OnlineLoop) -> None:
    def ready(**_: Any) -> None:
        online.start()
        reporter.set_state(WorkerState.READY)

    def draining(**_: Any) -> None:
        # Celery calls this from its SIGTERM handler, once per signal. It must not block:
        # a join interrupted by a second SIGTERM whose handler joins too deadlocked the
        # worker in "Warm shutdown" until its supervisor killed it. _serve waits for the
        # batch in progress once Celery has stopped.
        if online.request_stop():
            reporter.set_state(WorkerState.DRAINING)

    signals.worker_ready.connect(ready, weak=False)
    signals.worker_shutting_down.connect(draining, weak=False)


def _observer(
    recorder: MetricsRecorder, model_metrics: ModelMetrics, model: str, version: str
) -> Callable[[int, list[Any]], None]:
    """Record each batch's size and every metric the handler recorded for it
    (``HandlerTime``, ``PredictionTime`` and its own; ``ModelMetrics`` decides which
    reach the page and drops bad ones without raising)."""

    def observe(size: int, records: list[Any]) -> None:
        recorder.batch_size(model, version, size)
        model_metrics.record_all(records)

    return observe


def _online_loop(
    client: redis.Redis,
    spec: ModelSpec,
    args: argparse.Namespace,
    runner: ModelRunner,
    reporter: Reporter,
) -> OnlineLoop:
    """The loop serving the online queue over ``client`` (the process's bytes client)."""
    inflight = keys.inflight(args.wid)
    # The in-flight list lives as long as this worker; if the whole host vanishes it
    # expires on its own (its requests were answered "Worker died." by the API).
    reporter.keep_alive(inflight, int(max(spec.response_timeout * 2, 600) * 1000))
    batcher = Batcher(
        client,
        keys.online_queue(args.model, args.version),
        inflight,
        spec.batch_size,
        spec.max_batch_delay,
        slack=block_slack(client),
    )
    # clientTimeoutInMills is the worker's to apply: the API sends frames without a deadline.
    return OnlineLoop(client, runner, batcher, inflight, client_timeout_ms=spec.client_timeout_ms)


def main(argv: list[str] | None = None) -> int:
    """Run one worker until it is told to stop; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    settings = settings_from_env()
    # The process's only Redis clients (one pool per role): everything below uses them.
    clients = connect(settings.redis_url or "")
    started = wall()
    record = WorkerRecord(
        args.wid,
        args.model,
        args.version,
        args.host,
        os.getpid(),
        args.gpu,
        WorkerState.LOADING,
        started,
        since=started,
        heartbeat=started,
        slot=args.slot,
    )
    reporter = Reporter(clients.text, record)
    # The worker outlives a supervisor that crashed, until a successor adopts it or
    # its slot goes (workers.worker.heartbeat): draining is a SIGTERM to itself.
    lease = LeaseWatch(
        keys.slot(args.model, args.version, args.slot), args.host, float(settings.orphan_grace)
    )
    reporter.guard(lease, lambda reason: os.kill(os.getpid(), signal.SIGTERM))
    pid_file = Home.at(settings.home).worker_pid_of(args.wid)
    pid_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_pid(pid_file, os.getpid())  # how a stop finds a worker whose supervisor is gone
    reporter.set_state(WorkerState.LOADING)
    reporter.start()
    try:
        return _serve(settings, args, reporter, clients)
    finally:
        reporter.stop()
        pid_file.unlink(missing_ok=True)


def _serve(
    settings: Settings, args: argparse.Namespace, reporter: Reporter, clients: Clients
) -> int:
    started = wall()
    try:
        metrics_config = read_metrics_config(settings)
        record = Registry(clients.text).get(args.model, args.version)
        model = load(settings, model_store(settings), args, record, metrics_config)
    except LoadError as exc:
        # The whole traceback of the handler's exception (its cause), as TorchServe logs
        # it; the record keeps the one-line summary that describe shows as lastError.
        log.error(
            "model %s:%s failed to load: %s",
            args.model,
            args.version,
            exc,
            exc_info=exc.__cause__ or exc,
        )
        reporter.set_state(WorkerState.FAILED, str(exc))
        return EXIT_OUT_OF_MEMORY if exc.oom else EXIT_LOAD_FAILED
    log.info("model %s:%s loaded in %.3f s", args.model, args.version, wall() - started)
    parts = wire(settings, args, clients, reporter, model, record.spec, metrics_config, started)
    _wire_signals(reporter, parts.online)
    try:
        _run_celery(parts.app, args)
    finally:
        parts.online.stop()  # answers the batch in progress; the supervisor bounds how long
    return 0


@dataclass(frozen=True)
class Parts:
    """What a loaded model worker runs: its Celery app (the batch queue), its online
    loop, and the flusher of its metrics."""

    app: Celery
    online: OnlineLoop
    flusher: Flusher


def wire(
    settings: Settings,
    args: argparse.Namespace,
    clients: Clients,
    reporter: Reporter,
    model: LoadedModel,
    spec: ModelSpec,
    metrics_config: MetricsConfig,
    started: float,
) -> Parts:
    """Build what serves ``model`` (loaded since ``started``, wall clock) over the
    process's ``clients`` and no other connection pool: the metrics flusher and the
    Celery tasks use ``clients.text``, the online loop ``clients.frames``.

    Connects no signal and starts nothing but the flusher: :func:`_serve` does.
    """
    recorder = MetricsRecorder()
    flusher = recorder.start_flusher(clients.text)
    recorder.gauge(
        "WorkerLoadTime",
        (wall() - started) * 1000,
        {"WorkerName": f"W-{args.wid}-{args.model}_{args.version}", "Level": "Host"},
    )
    model_metrics = ModelMetrics(recorder, metrics_config, settings.model_metrics_auto_detect)
    model_metrics.record_all(model.load_metrics)  # what the handler recorded in initialize
    observe = _observer(recorder, model_metrics, args.model, args.version)
    runner = ModelRunner(model, reporter.busy, observe, reporter.progress)
    app = make_celery(settings)
    broker.guard(app)  # a queue entry that is not a message must not stop the worker
    register_tasks(app, runner, clients.text, args.wid, spec.response_timeout)
    online = _online_loop(clients.frames, spec, args, runner, reporter)
    # A loop that died or is stuck turns the worker FAILED: the supervisor replaces it.
    reporter.watch(online.failure)
    return Parts(app, online, flusher)


def _run_celery(app: Any, args: argparse.Namespace) -> None:
    """Consume the version's batch queue until a warm shutdown (SIGTERM)."""
    app.worker_main(
        [
            "worker",
            "--pool",
            "solo",
            "--queues",
            keys.batch_queue(args.model, args.version),
            "--hostname",
            f"mqserve-{args.wid}@{args.host}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--prefetch-multiplier",
            "1",
            "--loglevel",
            "INFO",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
