"""The metric families of mqserve and how their series are stored in Redis.

Every family lives in one HASH, ``keys.metrics(name)``. A series is one field of that
hash, named by :func:`series_field` (JSON of the sorted label pairs, so the same labels
always give the same field whatever order a caller passed them in), and its value is
a float:

* counters: summed over every process with ``HINCRBYFLOAT``;
* gauges: written with ``HSET``, the last writer wins;
* histograms: ``{series}|{le}`` fields hold the count of observations that fell in
  that bucket alone (not cumulative, so one observation is one increment) and
  ``{series}|sum`` their sum; the page cumulates the buckets when it renders them.

The families computed live at render time (queue depth, workers by state) are never
stored. The catalogue below fixes each family's type, HELP text and label order, which
the page follows as TorchServe's ``ts/configs/metrics.yaml`` does. Model (handler)
metric families are not built in: they come from a metrics.yaml's ``model_metrics`` or
are auto-detected, and are stored the same way plus one catalogue entry each (see
"model (handler) metrics" below).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import yaml


class Kind(enum.StrEnum):
    """Prometheus metric type, as written on the ``# TYPE`` line."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Family:
    """One metric family: name, type, HELP text and label order on the page."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    #: False for families computed from live state at render time.
    stored: bool = True
    #: A histogram's bucket upper bounds, ascending (``+Inf`` is implied); empty otherwise.
    buckets: tuple[float, ...] = ()


def _torchserve(name: str, kind: Kind, unit: str, labels: tuple[str, ...]) -> Family:
    # TorchServe's frontend writes exactly this HELP text for every family it registers.
    return Family(name, kind, f"Torchserve prometheus {kind} metric with unit: {unit}", labels)


HOST_LABELS = ("Level", "Hostname")
INFERENCE_LABELS = ("model_name", "model_version", "hostname")

REQUESTS_2XX = "Requests2XX"
REQUESTS_4XX = "Requests4XX"
REQUESTS_5XX = "Requests5XX"
INFERENCE_REQUESTS = "ts_inference_requests_total"
INFERENCE_LATENCY = "ts_inference_latency_microseconds"
QUEUE_LATENCY = "ts_queue_latency_microseconds"
QUEUE_DEPTH = "mqserve_queue_depth"
BATCH_QUEUE_DEPTH = "mqserve_batch_queue_depth"
WORKERS = "mqserve_workers"
BATCH_SIZE = "mqserve_batch_size"

#: Upper bounds of the batch size histogram's buckets (``+Inf`` is implied).
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)

#: Every family, in page order.
FAMILIES: tuple[Family, ...] = (
    _torchserve(REQUESTS_2XX, Kind.COUNTER, "Count", HOST_LABELS),
    _torchserve(REQUESTS_4XX, Kind.COUNTER, "Count", HOST_LABELS),
    _torchserve(REQUESTS_5XX, Kind.COUNTER, "Count", HOST_LABELS),
    _torchserve(INFERENCE_REQUESTS, Kind.COUNTER, "Count", INFERENCE_LABELS),
    _torchserve(INFERENCE_LATENCY, Kind.COUNTER, "Microseconds", INFERENCE_LABELS),
    _torchserve(QUEUE_LATENCY, Kind.COUNTER, "Microseconds", INFERENCE_LABELS),
    _torchserve("QueueTime", Kind.GAUGE, "Milliseconds", HOST_LABELS),
    _torchserve("WorkerThreadTime", Kind.GAUGE, "Milliseconds", HOST_LABELS),
    _torchserve("WorkerLoadTime", Kind.GAUGE, "Milliseconds", ("WorkerName", *HOST_LABELS)),
    # metrics.yaml gives the backend's model metrics the unit "ms", not "Milliseconds".
    _torchserve("HandlerTime", Kind.GAUGE, "ms", ("ModelName", *HOST_LABELS)),
    _torchserve("PredictionTime", Kind.GAUGE, "ms", ("ModelName", *HOST_LABELS)),
    Family(
        QUEUE_DEPTH,
        Kind.GAUGE,
        # The same count as describe's jobQueueStatus.pendingRequests.
        "mqserve online requests waiting for a worker per model version",
        ("model_name", "model_version"),
        stored=False,
    ),
    Family(
        BATCH_QUEUE_DEPTH,
        Kind.GAUGE,
        "mqserve batch-job and Celery messages waiting for a worker per model version",
        ("model_name", "model_version"),
        stored=False,
    ),
    Family(
        WORKERS,
        Kind.GAUGE,
        "mqserve live worker processes per model version and state",
        ("model_name", "model_version", "state"),
        stored=False,
    ),
    Family(
        BATCH_SIZE,
        Kind.HISTOGRAM,
        "mqserve size of the batches workers handed to handlers",
        ("model_name", "model_version"),
        buckets=BATCH_BUCKETS,
    ),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}

#: Gauges :meth:`control.metrics.recorder.MetricsRecorder.gauge` accepts.
GAUGES = frozenset(f.name for f in FAMILIES if f.kind is Kind.GAUGE and f.stored)

#: Separates a histogram series from its part (a bucket bound or ``sum``).
PART_SEPARATOR = "|"
SUM_PART = "sum"


def series_field(labels: dict[str, str]) -> str:
    """The hash field naming the series with ``labels`` (independent of dict order)."""
    return json.dumps(sorted(labels.items()), separators=(",", ":"), ensure_ascii=False)


def parse_field(field: str) -> dict[str, str]:
    """The labels of a field written by :func:`series_field`."""
    return {str(k): str(v) for k, v in json.loads(field)}


def bucket_part(n: float, bounds: tuple[float, ...] = BATCH_BUCKETS) -> str:
    """The histogram part an observation of ``n`` counts in (its bucket's bound).

    ``bounds`` are the family's ascending upper bounds; a bucket holds ``n <= bound``.
    """
    for bound in bounds:
        if n <= bound:
            return format_value(bound)
    return "+Inf"


def format_value(value: float) -> str:
    """A sample value as Java's ``Double.toString`` writes it (TorchServe's page).

    Always at least one decimal (``8.0``); scientific notation with ``E`` outside
    [1e-3, 1e7), e.g. ``1.2345678E7``; ``+Inf``, ``-Inf`` and ``NaN`` as Prometheus
    spells them.
    """
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    magnitude = abs(value)
    if magnitude == 0 or 1e-3 <= magnitude < 1e7:
        # Python's repr is the shortest round-tripping decimal, as Java's is, and uses no
        # exponent in this range.
        return repr(float(value))
    # Shortest round-tripping digits again, rewritten as d.dddE<exp>.
    _, digit_tuple, exponent = Decimal(repr(magnitude)).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0") or "0"
    exp = len(digit_tuple) - 1 + int(exponent)
    return f"{'-' if value < 0 else ''}{digits[0]}.{digits[1:] or '0'}E{exp}"


def escape_label(value: str) -> str:
    """A label value escaped for the text format: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- model (handler) metrics --------------------------------------------------------------
#
# TorchServe's frontend registers the ``model_metrics`` of its metrics.yaml at start and
# exports a handler's metric record only when its name is one of them, or, with
# ``model_metrics_auto_detect``, registers an unknown name on first sight (type, unit and
# dimension names from the record). Every model metric gets a ``Hostname`` label after
# its declared dimensions. Here the worker process plays that frontend part
# (:class:`control.metrics.recorder.ModelMetrics`) and writes each family it exports to the
# catalogue hash ``keys.METRIC_FAMILIES`` (name -> :func:`family_json`), which the page
# reads to render families that are not built in.

#: Where the default metrics configuration ships: TorchServe 0.12's ``ts/configs/metrics.yaml``.
DEFAULT_METRICS_CONFIG = Path(__file__).resolve().parent / "configs" / "metrics.yaml"

#: Prometheus simpleclient's default histogram buckets, which TorchServe's histograms use.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

#: The label TorchServe adds after the declared dimensions of every model metric.
HOSTNAME_LABEL = "Hostname"

#: Built-in families that are model metrics too: a handler's records of these names are
#: written to them (when type and labels agree); any other built-in name is refused.
MODEL_FAMILIES = frozenset({"HandlerTime", "PredictionTime"})

#: TorchServe's backend unit names (``ts/metrics/unit.py``): the unit an auto-detected
#: family's HELP line shows. Units not listed are shown as given.
UNIT_NAMES = {
    "ms": "Milliseconds",
    "s": "Seconds",
    "percent": "Percent",
    "count": "Count",
    "MB": "Megabytes",
    "GB": "Gigabytes",
    "kB": "Kilobytes",
    "B": "Bytes",
    "": "unit",
}

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class MetricsConfigError(ValueError):
    """A metrics configuration is unusable; the message says which entry and why."""


@dataclass(frozen=True)
class MetricSpec:
    """One entry of a metrics.yaml ``model_metrics`` section."""

    name: str
    kind: Kind
    unit: str
    dimensions: tuple[str, ...]

    def family(self) -> Family:
        """The family TorchServe registers for it: the dimensions, then ``Hostname``."""
        return model_family(self.name, self.kind, self.unit, self.dimensions)


@dataclass(frozen=True)
class MetricsConfig:
    """What mqserve uses of a TorchServe metrics.yaml: its ``model_metrics``, in file order.

    The ``ts_metrics`` section is checked to be a mapping and otherwise not used: the
    frontend families are built in (:data:`FAMILIES`).
    """

    model_metrics: tuple[MetricSpec, ...]


def model_family(name: str, kind: Kind, unit: str, dimensions: tuple[str, ...]) -> Family:
    """The family of a model metric; raises MetricsConfigError for names Prometheus refuses.

    Metric names must match ``[a-zA-Z_:][a-zA-Z0-9_:]*`` and label names
    ``[a-zA-Z_][a-zA-Z0-9_]*`` (not starting with ``__``); labels must be distinct,
    ``Hostname`` is added (so it may not be declared) and a histogram may not have ``le``.
    """
    if not _METRIC_NAME.fullmatch(name):
        raise MetricsConfigError(f"metric name {name!r} is not a valid Prometheus name")
    labels = (*dimensions, HOSTNAME_LABEL)
    for label in dimensions:
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
            raise MetricsConfigError(f"metric {name}: {label!r} is not a valid label name")
    if len(set(labels)) != len(labels):
        raise MetricsConfigError(
            f"metric {name}: dimensions {list(dimensions)} repeat a name (Hostname is added)"
        )
    if kind is Kind.HISTOGRAM and "le" in labels:
        raise MetricsConfigError(f"metric {name}: a histogram cannot have the label 'le'")
    return Family(
        name,
        kind,
        f"Torchserve prometheus {kind} metric with unit: {unit}",
        labels,
        buckets=DEFAULT_BUCKETS if kind is Kind.HISTOGRAM else (),
    )


def load_metrics_config(path: Path | None = None) -> MetricsConfig:
    """Read a TorchServe metrics.yaml (``yaml.safe_load``); None reads the default one.

    Raises :class:`MetricsConfigError` naming the file when it cannot be read or parsed
    or breaks :func:`parse_metrics_config`'s rules.
    """
    path = DEFAULT_METRICS_CONFIG if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MetricsConfigError(
            f"cannot read metrics config {path}: {exc.strerror or exc}"
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MetricsConfigError(f"metrics config {path} is not valid YAML: {exc}") from exc
    try:
        return parse_metrics_config(data)
    except MetricsConfigError as exc:
        raise MetricsConfigError(f"metrics config {path}: {exc}") from exc


def parse_metrics_config(data: object) -> MetricsConfig:
    """The ``model_metrics`` of a parsed metrics.yaml, with TorchServe's checks.

    As ``MetricsCacheYamlImpl.initialize_cache``: ``model_metrics`` must be present and
    not empty, its keys are ``counter``, ``gauge`` or ``histogram``, and each entry has
    ``name``, ``unit`` (non-empty strings, as the frontend requires) and ``dimensions`` (a
    list of strings; null is empty). A name declared twice keeps its last entry, as
    TorchServe's caches do. Raises :class:`MetricsConfigError`.
    """
    if not isinstance(data, dict):
        raise MetricsConfigError("the file must be a YAML mapping")
    if not isinstance(data.get("ts_metrics", {}), dict | None):
        raise MetricsConfigError("ts_metrics must be a mapping of metric types")
    if "model_metrics" not in data:
        raise MetricsConfigError("'model_metrics' key not found")
    section = data["model_metrics"]
    if not section:
        raise MetricsConfigError("Missing `model_metrics` specification")
    if not isinstance(section, dict):
        raise MetricsConfigError("model_metrics must be a mapping of metric types")
    specs: dict[str, MetricSpec] = {}
    for type_name, entries in section.items():
        try:
            kind = Kind(type_name)
        except ValueError:
            raise MetricsConfigError(
                f"Invalid metric type {type_name!r} (counter, gauge or histogram)"
            ) from None
        if not isinstance(entries, list):
            raise MetricsConfigError(f"model_metrics.{type_name} must be a list of metrics")
        for entry in entries:
            spec = _metric_spec(kind, entry)
            specs.pop(spec.name, None)  # the last declaration wins, in its own place
            specs[spec.name] = spec
    return MetricsConfig(tuple(specs.values()))


def _metric_spec(kind: Kind, entry: object) -> MetricSpec:
    if not isinstance(entry, dict):
        raise MetricsConfigError(f"a {kind} entry must be a mapping with name, unit, dimensions")
    missing = [key for key in ("name", "unit", "dimensions") if key not in entry]
    if missing:
        raise MetricsConfigError(f"Key not found in cache spec: {missing[0]!r} in {entry}")
    name, unit, dimensions = entry["name"], entry["unit"], entry["dimensions"] or []
    if not isinstance(name, str) or not name:
        raise MetricsConfigError(f"Metric name cannot be empty: {entry}")
    if not isinstance(unit, str) or not unit:
        raise MetricsConfigError(f"Metric unit cannot be empty: {entry}")
    if not isinstance(dimensions, list) or not all(isinstance(d, str) for d in dimensions):
        raise MetricsConfigError(f"metric {name}: dimensions must be a list of names")
    spec = MetricSpec(name, kind, unit, tuple(dimensions))
    spec.family()  # checks the names
    return spec


def family_json(family: Family) -> str:
    """A model family as stored in the catalogue; :func:`family_from_json` reads it."""
    body: dict[str, object] = {
        "kind": family.kind.value,
        "help": family.help,
        "labels": list(family.labels),
    }
    if family.buckets:
        body["buckets"] = list(family.buckets)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def family_from_json(name: str, text: str) -> Family | None:
    """The family a catalogue entry describes; None for an entry that is not one."""
    try:
        body = json.loads(text)
        kind = Kind(body["kind"])
        labels = tuple(str(label) for label in body["labels"])
        buckets = tuple(sorted(float(b) for b in body.get("buckets", ())))
        return Family(name, kind, str(body["help"]), labels, buckets=buckets)
    except (ValueError, KeyError, TypeError):
        return None
