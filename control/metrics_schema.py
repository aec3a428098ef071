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
the page follows as TorchServe's ``ts/configs/metrics.yaml`` does.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from decimal import Decimal


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
        "mqserve requests waiting for a worker (online and batch queues) per model version",
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
    ),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}

#: Gauges :meth:`control.metrics.MetricsRecorder.gauge` accepts.
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


def bucket_part(n: float) -> str:
    """The histogram part an observation of ``n`` counts in (its bucket's bound)."""
    for bound in BATCH_BUCKETS:
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
