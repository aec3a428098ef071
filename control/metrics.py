"""Metrics: an in-process recorder, its flusher to Redis, and the metrics port (8082).

Every API process records into its own :class:`MetricsRecorder` (a dict update under
a lock, cheap enough for every request) and a background thread adds the accumulated
deltas to Redis once a second, so the page served by any process shows the sum over
all of them, at most one flush interval late. Storage layout and the family catalogue
are in :mod:`control.metrics_schema`; the page itself in :mod:`control.metrics_render`.

Start the flusher in each process that records (after gunicorn forks: a thread started
in the master does not exist in its workers).
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import falcon
import redis
from redis.typing import EncodableT, FieldT

from control import keys
from control.errors import MethodNotAllowedException, ResourceNotFoundException
from control.http import new_app, segments, send_json
from control.metrics_render import CONTENT_TYPE, render
from control.metrics_schema import (
    BATCH_SIZE,
    BY_NAME,
    GAUGES,
    INFERENCE_LABELS,
    INFERENCE_LATENCY,
    INFERENCE_REQUESTS,
    PART_SEPARATOR,
    QUEUE_LATENCY,
    REQUESTS_2XX,
    REQUESTS_4XX,
    REQUESTS_5XX,
    SUM_PART,
    bucket_part,
    series_field,
)
from control.openapi import load_description

__all__ = [
    "CONTENT_TYPE",
    "CountResponses",
    "Flusher",
    "MetricsRecorder",
    "create_metrics_app",
    "render",
]

log = logging.getLogger(__name__)

#: (family name, hash field) -> amount to add.
Deltas = defaultdict[tuple[str, str], float]

#: Bound on the per-process cache of model label fields (one entry per model version).
_FIELD_CACHE_SIZE = 4096


class MetricsRecorder:
    """Counters, gauges and histogram observations of one process, until flushed.

    Thread-safe. Recording never touches Redis and never raises (except ValueError for
    a gauge name outside the catalogue, a programming error). ``hostname`` fills the
    ``Hostname``/``hostname`` labels (default: this machine's name).
    """

    def __init__(self, hostname: str | None = None) -> None:
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self._lock = threading.Lock()
        self._increments: Deltas = defaultdict(float)
        self._gauges: dict[tuple[str, str], float] = {}
        self._host_field = series_field({"Level": "Host", "Hostname": self.hostname})
        self._model_fields: dict[tuple[str, str], str] = {}
        self._failing = False

    # -- recording -------------------------------------------------------------------

    def request(self, status: int) -> None:
        """Count one response by status class; 1xx and 3xx are not counted (as TorchServe)."""
        if 200 <= status < 300:
            family = REQUESTS_2XX
        elif 400 <= status < 500:
            family = REQUESTS_4XX
        elif 500 <= status < 600:
            family = REQUESTS_5XX
        else:
            return
        with self._lock:
            self._increments[family, self._host_field] += 1.0

    def inference(self, model: str, version_label: str, latency_us: float, queue_us: float) -> None:
        """One inference answered: ``version_label`` is ``default`` when the URL named none."""
        field = self._model_field(model, version_label)
        with self._lock:
            self._increments[INFERENCE_REQUESTS, field] += 1.0
            self._increments[INFERENCE_LATENCY, field] += float(latency_us)
            self._increments[QUEUE_LATENCY, field] += float(queue_us)

    def gauge(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        """Set a TorchServe gauge (``WorkerLoadTime``, ``HandlerTime``...); last value wins.

        ``Hostname`` is filled in when the family has it and ``labels`` does not.
        Raises ValueError for a name that is not a gauge of the catalogue.
        """
        if name not in GAUGES:
            raise ValueError(f"unknown gauge: {name}")
        full = dict(labels)
        if "Hostname" in BY_NAME[name].labels:
            full.setdefault("Hostname", self.hostname)
        field = series_field(full)
        with self._lock:
            self._gauges[name, field] = float(value)

    def batch_size(self, model: str, version: str, n: int) -> None:
        """Observe one batch of ``n`` (>= 1) requests handed to a model version's handler."""
        series = series_field({"model_name": model, "model_version": version})
        bucket = f"{series}{PART_SEPARATOR}{bucket_part(n)}"
        total = f"{series}{PART_SEPARATOR}{SUM_PART}"
        with self._lock:
            self._increments[BATCH_SIZE, bucket] += 1.0
            self._increments[BATCH_SIZE, total] += float(n)

    def _model_field(self, model: str, version_label: str) -> str:
        # Read and written without the lock: single dict operations are atomic, and a
        # lost race only costs one more JSON encoding of the same field.
        cache = self._model_fields
        field = cache.get((model, version_label))
        if field is None:
            values = (model, version_label, self.hostname)
            field = series_field(dict(zip(INFERENCE_LABELS, values, strict=True)))
            if len(cache) >= _FIELD_CACHE_SIZE:
                cache.clear()  # many versions came and went; the cache only saves JSON work
            cache[model, version_label] = field
        return field

    # -- flushing --------------------------------------------------------------------

    def pending(self) -> bool:
        """True when something was recorded and not yet flushed."""
        with self._lock:
            return bool(self._increments or self._gauges)

    def flush(self, client: redis.Redis) -> bool:
        """Add the deltas to Redis in one MULTI/EXEC pipeline and forget them.

        Never raises: on any error the deltas are logged about and kept (merged with
        whatever was recorded meanwhile) for the next flush, and False is returned.
        """
        with self._lock:
            increments, gauges = self._increments, self._gauges
            self._increments, self._gauges = defaultdict(float), {}
        if not increments and not gauges:
            return True
        try:
            _write(client, increments, gauges)
        except Exception as exc:
            # Metrics must never break serving: keep the deltas and try again next time.
            self._restore(increments, gauges)
            self._report(exc)
            return False
        self._report(None)
        return True

    def _report(self, exc: Exception | None) -> None:
        """Log a failure once per outage (a flush a second would flood the log)."""
        if exc is not None and not self._failing:
            log.warning("metrics flush to Redis failed, deltas kept: %r", exc)
        elif exc is not None:
            log.debug("metrics flush to Redis still failing: %r", exc)
        elif self._failing:
            log.info("metrics flush to Redis works again")
        self._failing = exc is not None

    def _restore(self, increments: Deltas, gauges: dict[tuple[str, str], float]) -> None:
        with self._lock:
            for key, delta in increments.items():
                self._increments[key] += delta
            for key, value in gauges.items():
                self._gauges.setdefault(key, value)  # a newer value recorded meanwhile wins

    def start_flusher(
        self, client_factory: Callable[[], redis.Redis], interval: float = 1.0
    ) -> Flusher:
        """Flush every ``interval`` seconds in a daemon thread, and once more at exit."""
        flusher = Flusher(self, client_factory, interval)
        flusher.start()
        return flusher


class Flusher:
    """The daemon thread flushing one recorder; :meth:`stop` flushes a last time.

    The client is made by ``client_factory`` inside the thread on first use (and again
    after a failure to make one); nothing is raised out of the thread.
    """

    def __init__(
        self,
        recorder: MetricsRecorder,
        client_factory: Callable[[], redis.Redis],
        interval: float,
    ) -> None:
        self._recorder = recorder
        self._factory = client_factory
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-flusher", daemon=True)
        self._client: redis.Redis | None = None

    def start(self) -> None:
        """Start the thread and register :meth:`stop` to run at interpreter exit."""
        self._thread.start()
        atexit.register(self.stop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after one last flush (waiting at most ``timeout`` seconds)."""
        atexit.unregister(self.stop)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush_once()
        self._flush_once()

    def _flush_once(self) -> None:
        if not self._recorder.pending():
            return
        if self._client is None:
            try:
                self._client = self._factory()
            except Exception as exc:
                log.warning("metrics flusher could not make a Redis client: %r", exc)
                return
        self._recorder.flush(self._client)


def _write(client: redis.Redis, increments: Deltas, gauges: dict[tuple[str, str], float]) -> None:
    pipe = client.pipeline(transaction=True)
    for (family, field), delta in increments.items():
        pipe.hincrbyfloat(keys.metrics(family), field, delta)
    by_family: dict[str, dict[FieldT, EncodableT]] = defaultdict(dict)
    for (family, field), value in gauges.items():
        by_family[family][field] = value
    for family, mapping in by_family.items():
        pipe.hset(keys.metrics(family), mapping=mapping)
    pipe.execute()


class CountResponses:
    """Falcon middleware counting every response in ``Requests2XX/4XX/5XX``.

    Runs after the error handlers, so error responses count with their final status.
    """

    def __init__(self, recorder: MetricsRecorder) -> None:
        self._recorder = recorder

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, ok: bool
    ) -> None:
        self._recorder.request(resp.status_code)


class MetricsRoutes:
    """A Falcon sink answering every path of the metrics port.

    ``GET /metrics`` (and HEAD) serve the page; ``OPTIONS /`` and ``/api-description``
    (any method) the OpenAPI description; any other method on ``/`` or ``/metrics`` is
    405 and any other path 404. Trailing slashes are ignored.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: Any) -> None:
        segs = segments(req.path)
        if not segs:
            if req.method != "OPTIONS":
                raise MethodNotAllowedException()
            send_json(resp, load_description("metrics"))
        elif segs == ["", "api-description"]:
            send_json(resp, load_description("metrics"))
        elif segs == ["", "metrics"]:
            if req.method not in ("GET", "HEAD"):
                raise MethodNotAllowedException()
            # Blank values are kept: TorchServe filters on them too (to an empty page).
            query = parse_qs(req.query_string, keep_blank_values=True)
            names = set(query["name[]"]) if "name[]" in query else None
            resp.status = 200
            resp.content_type = CONTENT_TYPE
            resp.text = render(self._client, names)
        else:
            raise ResourceNotFoundException()


def create_metrics_app(
    client: redis.Redis, recorder: MetricsRecorder | None = None
) -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app of the metrics port; no token check (TorchServe has none there).

    With ``recorder``, this port's own responses are counted too, as TorchServe counts
    the responses of every port.
    """
    app = new_app([CountResponses(recorder)] if recorder is not None else [])
    app.add_sink(MetricsRoutes(client), prefix="/")
    return app
