"""Metrics: an in-process recorder and its flusher to Redis.

Every API process records into its own :class:`MetricsRecorder` (a dict update under
a lock, cheap enough for every request) and a background thread adds the accumulated
deltas to Redis once a second, so the page served by any process shows the sum over
all of them, at most one flush interval late. Storage layout and the family catalogue
are in :mod:`control.core.metrics_schema`; the page itself in :mod:`control.metrics.render`;
the metrics port (8082) and the response-counting middleware in :mod:`control.metrics.api`.
This module imports no HTTP framework: model workers record through it.

Start the flusher in each process that records (after gunicorn forks: a thread started
in the master does not exist in its workers).

Handler metrics (``context.metrics`` in a model worker) reach the page through
:class:`ModelMetrics`, which does what TorchServe's frontend does with the backend's
metric lines: keep the records of families the metrics.yaml declares (or, with
``model_metrics_auto_detect``, of any family, registered on first sight), label them
with their dimensions plus ``Hostname``, and drop the rest with a log line.
"""

from __future__ import annotations

import atexit
import logging
import math
import numbers
import socket
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Protocol

import redis
from redis.typing import EncodableT, FieldT

from control.core import keys
from control.core.metrics_schema import (
    BATCH_SIZE,
    BY_NAME,
    GAUGES,
    INFERENCE_LABELS,
    INFERENCE_LATENCY,
    INFERENCE_REQUESTS,
    MODEL_FAMILIES,
    PART_SEPARATOR,
    QUEUE_LATENCY,
    REQUESTS_2XX,
    REQUESTS_4XX,
    REQUESTS_5XX,
    SUM_PART,
    UNIT_NAMES,
    Family,
    Kind,
    MetricsConfig,
    MetricsConfigError,
    bucket_part,
    family_json,
    model_family,
    series_field,
)
from control.metrics.render import CONTENT_TYPE, render

__all__ = [
    "CONTENT_TYPE",
    "Flusher",
    "MetricsRecorder",
    "ModelMetrics",
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
        #: Catalogue entries to write: family name -> (JSON, overwrite an existing entry).
        self._families: dict[str, tuple[str, bool]] = {}
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

    def model_metric(self, family: Family, labels: Mapping[str, str], value: float) -> None:
        """One handler metric update: a counter adds ``value``, a gauge is set to it, a
        histogram observes it. ``labels`` are the series' full labels (``Hostname``
        included); ``family`` should be registered (:meth:`register_family`).
        """
        field = series_field(dict(labels))
        with self._lock:
            if family.kind is Kind.COUNTER:
                self._increments[family.name, field] += float(value)
            elif family.kind is Kind.GAUGE:
                self._gauges[family.name, field] = float(value)
            else:
                bucket = f"{field}{PART_SEPARATOR}{bucket_part(value, family.buckets)}"
                self._increments[family.name, bucket] += 1.0
                self._increments[family.name, f"{field}{PART_SEPARATOR}{SUM_PART}"] += value

    def register_family(self, family: Family, overwrite: bool) -> None:
        """Write ``family`` to the stack's catalogue (``keys.METRIC_FAMILIES``) at the next
        flush: replacing an existing entry when ``overwrite``, else only if it has none
        (the first process to auto-detect a family fixes its labels for everyone).
        """
        with self._lock:
            self._families[family.name] = (family_json(family), overwrite)

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
            return bool(self._increments or self._gauges or self._families)

    def flush(self, client: redis.Redis) -> bool:
        """Add the deltas to Redis in one MULTI/EXEC pipeline and forget them.

        Never raises: on any error the deltas are logged about and kept (merged with
        whatever was recorded meanwhile) for the next flush, and False is returned.
        """
        with self._lock:
            increments, gauges, families = self._increments, self._gauges, self._families
            self._increments, self._gauges, self._families = defaultdict(float), {}, {}
        if not increments and not gauges and not families:
            return True
        try:
            _write(client, increments, gauges, families)
        except Exception as exc:
            # Metrics must never break serving: keep the deltas and try again next time.
            self._restore(increments, gauges, families)
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

    def _restore(
        self,
        increments: Deltas,
        gauges: dict[tuple[str, str], float],
        families: dict[str, tuple[str, bool]],
    ) -> None:
        with self._lock:
            for key, delta in increments.items():
                self._increments[key] += delta
            for key, value in gauges.items():
                self._gauges.setdefault(key, value)  # a newer value recorded meanwhile wins
            for name, entry in families.items():
                self._families.setdefault(name, entry)

    def start_flusher(self, client: redis.Redis, interval: float = 1.0) -> Flusher:
        """Flush to ``client`` every ``interval`` seconds in a daemon thread, and once more
        at exit."""
        flusher = Flusher(self, client, interval)
        flusher.start()
        return flusher


class Flusher:
    """The daemon thread flushing one recorder; :meth:`stop` flushes a last time.

    ``client`` is the process's own (a redis-py pool, shared with its other threads,
    which reconnects by itself after an outage); nothing is raised out of the thread: a
    flush that fails keeps its deltas for the next one (:meth:`MetricsRecorder.flush`).
    """

    def __init__(self, recorder: MetricsRecorder, client: redis.Redis, interval: float) -> None:
        self._recorder = recorder
        self._client = client
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-flusher", daemon=True)

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
        if self._recorder.pending():
            self._recorder.flush(self._client)


def _write(
    client: redis.Redis,
    increments: Deltas,
    gauges: dict[tuple[str, str], float],
    families: dict[str, tuple[str, bool]],
) -> None:
    pipe = client.pipeline(transaction=True)
    # In the same transaction as the series: a page never shows a series of a family it
    # has no type for.
    for name, (text, overwrite) in families.items():
        if overwrite:
            pipe.hset(keys.METRIC_FAMILIES, name, text)
        else:
            pipe.hsetnx(keys.METRIC_FAMILIES, name, text)
    for (family, field), delta in increments.items():
        pipe.hincrbyfloat(keys.metrics(family), field, delta)
    by_family: dict[str, dict[FieldT, EncodableT]] = defaultdict(dict)
    for (family, field), value in gauges.items():
        by_family[family][field] = value
    for family, mapping in by_family.items():
        pipe.hset(keys.metrics(family), mapping=mapping)
    pipe.execute()


class HandlerRecord(Protocol):
    """What :class:`ModelMetrics` reads of one handler metric record
    (``workers.handling.metrics.MetricRecord``)."""

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> float: ...

    @property
    def unit(self) -> str: ...

    @property
    def metric_type(self) -> str: ...

    @property
    def dimensions(self) -> Mapping[str, str]: ...


class ModelMetrics:
    """TorchServe's frontend part for one worker's handler metrics: what reaches the page.

    Every ``model_metrics`` entry of ``config`` is a family from the start, written to
    the catalogue (overwriting: the stack shows the config's types and labels, and the
    page has its HELP and TYPE lines before any series). :meth:`record` then takes each
    record the handler made:

    * its family is the declared one of that name, whatever type the record says (the
      frontend looks metrics up by name). Otherwise, with ``auto_detect``, one is
      registered on first sight from the record: its type, its unit as TorchServe's
      backend names it (``ms`` -> ``Milliseconds``) and its dimension names. Otherwise
      the record is dropped, as TorchServe drops metrics its config does not declare;
    * its dimension values pair up in order with the family's labels, ``Hostname`` (this
      machine) last; a record with another number of values is dropped;
    * a value that is not a finite number is dropped, and so is a negative counter
      increment.

    Built-in family names are refused, except :data:`MODEL_FAMILIES` for records whose
    family has the built-in type and labels. Dropping logs a warning once per metric
    name and reason (then at debug level); nothing here raises.
    """

    def __init__(self, recorder: MetricsRecorder, config: MetricsConfig, auto_detect: bool) -> None:
        self._recorder = recorder
        self._auto_detect = auto_detect
        self._families: dict[str, Family] = {}
        self._refused: set[str] = set()
        self._warned: set[tuple[str, str]] = set()
        for spec in config.model_metrics:
            family = spec.family()
            if self._usable(family):
                self._families[family.name] = family
                if family.name not in BY_NAME:
                    recorder.register_family(family, overwrite=True)

    def record_all(self, records: Iterable[HandlerRecord]) -> None:
        """:meth:`record` each of ``records``, in order."""
        for record in records:
            self.record(record)

    def record(self, record: HandlerRecord) -> bool:
        """Export one record to the recorder; True when written, False when dropped."""
        try:
            return self._record(record)
        except Exception:  # a handler's metric must never break serving
            log.exception("handler metric %r dropped", getattr(record, "name", "?"))
            return False

    def _record(self, record: HandlerRecord) -> bool:
        family = self._families.get(record.name) or self._detect(record)
        if family is None:
            return False
        values = [*(str(v) for v in record.dimensions.values()), self._recorder.hostname]
        if len(values) != len(family.labels):
            self._drop(
                record.name,
                f"dimension values {values[:-1]} do not match its dimensions "
                f"{list(family.labels[:-1])}",
            )
            return False
        value = _finite(record.value)
        if value is None or (family.kind is Kind.COUNTER and value < 0):
            self._drop(record.name, f"value {record.value!r} is not a valid {family.kind} value")
            return False
        labels = dict(zip(family.labels, values, strict=True))
        self._recorder.model_metric(family, labels, value)
        return True

    def _detect(self, record: HandlerRecord) -> Family | None:
        """The family auto-detected from ``record``, or None when it is not exported."""
        if not self._auto_detect:
            self._drop(record.name, "not in the metrics config (model_metrics_auto_detect off)")
            return None
        if record.name in self._refused:
            return None
        try:
            kind = Kind(str(record.metric_type).lower())
            unit = UNIT_NAMES.get(record.unit, record.unit)
            family = model_family(record.name, kind, unit, tuple(record.dimensions))
        except (ValueError, MetricsConfigError) as exc:
            self._refused.add(record.name)
            self._drop(record.name, f"cannot be registered: {exc}")
            return None
        if not self._usable(family):
            self._refused.add(record.name)
            return None
        log.info("Registering auto detected backend metric: %s", family.name)
        self._families[family.name] = family
        self._recorder.register_family(family, overwrite=False)
        return family

    def _usable(self, family: Family) -> bool:
        builtin = BY_NAME.get(family.name)
        if builtin is None or (
            family.name in MODEL_FAMILIES
            and (builtin.kind, builtin.labels) == (family.kind, family.labels)
        ):
            return True
        self._drop(family.name, "its name is a built-in family with another type or labels")
        return False

    def _drop(self, name: str, reason: str) -> None:
        # Once per metric and reason: a handler updating a bad metric per request would
        # otherwise write a warning per request.
        first = (name, reason) not in self._warned
        self._warned.add((name, reason))
        log.log(logging.WARNING if first else logging.DEBUG, "metric %s dropped: %s", name, reason)


def _finite(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (bool is not one), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
