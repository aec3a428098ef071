"""Handler metrics: the ``context.metrics`` object TorchServe handlers write to.

TorchServe's backend keeps a metrics cache and logs each update for the frontend to
collect; here every update is appended to :attr:`MetricsRecorder.records` and the
worker takes them with :meth:`MetricsRecorder.drain` after a load or a batch. The
method names and argument orders are TorchServe's (``ts/metrics/metric_cache_abstract.py``)
so that handler code calling ``metrics.add_time("HandlerTime", ms, None, "ms")`` or
``metrics.add_metric_to_cache(...).add_or_update(...)`` runs unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

TIME_UNITS = ("ms", "s")
SIZE_UNITS = ("MB", "kB", "GB", "B")


class MetricTypes(enum.StrEnum):
    """TorchServe's metric kinds (``ts.metrics.metric_type_enum.MetricTypes``)."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Dimension:
    """A metric dimension, a name/value pair (``ts.metrics.dimension.Dimension``)."""

    name: str
    value: str

    def __str__(self) -> str:
        return f"{self.name}:{self.value}"


@dataclass(frozen=True)
class MetricRecord:
    """One metric update as a handler or the service made it."""

    name: str
    value: float
    unit: str
    metric_type: MetricTypes
    dimensions: dict[str, str]
    #: The request the update belongs to; several ids comma-joined, None outside a batch.
    request_id: str | None


class MetricsCacheKeyError(KeyError):
    """``get_metric`` was asked for a metric nobody added."""


class CachingMetric:
    """A declared metric that handler code updates (TorchServe's ``CachingMetric``)."""

    def __init__(
        self,
        recorder: MetricsRecorder,
        name: str,
        unit: str,
        dimension_names: Sequence[str],
        metric_type: MetricTypes,
    ) -> None:
        self._recorder = recorder
        self.metric_name = name
        self.unit = unit
        self.dimension_names = list(dimension_names)
        self.metric_type = metric_type

    def add_or_update(
        self,
        value: float,
        dimension_values: Sequence[str] = (),
        request_id: str = "",
    ) -> None:
        """Record ``value``; dimension values pair up with the declared names in order."""
        dims = dict(zip(self.dimension_names, (str(v) for v in dimension_values), strict=False))
        record = MetricRecord(
            self.metric_name, value, self.unit, self.metric_type, dims, request_id or None
        )
        self._recorder.records.append(record)

    def update(
        self,
        value: float,
        request_id: str = "",
        dimensions: Sequence[Dimension] = (),
    ) -> None:
        """Older TorchServe spelling: dimensions as :class:`Dimension` objects."""
        self.add_or_update(value, [d.value for d in dimensions], request_id)


class MetricsRecorder:
    """``context.metrics``: records every update in :attr:`records` (oldest first)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.records: list[MetricRecord] = []
        #: ``{batch index: request id}`` of the batch being handled, None between batches.
        self.request_ids: dict[int, str] | None = None
        self._cache: dict[tuple[MetricTypes, str], CachingMetric] = {}

    def set_request_ids(self, request_ids: dict[int, str] | None) -> None:
        self.request_ids = request_ids

    def drain(self) -> list[MetricRecord]:
        """Return the records made since the last drain and forget them."""
        records, self.records = self.records, []
        return records

    # -- TorchServe's metrics cache API --------------------------------------------------

    def add_metric(
        self,
        name: str,
        value: float,
        unit: str,
        idx: int | None = None,
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> None:
        """Record a metric with any unit (TorchServe defaults these to counters)."""
        self._record(name, value, unit, idx, dimensions, metric_type)

    def add_counter(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        dimensions: Sequence[Dimension] = (),
    ) -> None:
        self._record(name, value, "count", idx, dimensions, MetricTypes.COUNTER)

    def add_time(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        unit: str = "ms",
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        """Record a duration; ``unit`` must be ``ms`` or ``s`` (ValueError otherwise)."""
        if unit not in TIME_UNITS:
            raise ValueError("the unit for a timed metric should be one of ['ms', 's']")
        self._record(name, value, unit, idx, dimensions, metric_type)

    def add_size(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        unit: str = "MB",
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        """Record a size; ``unit`` is one of ``MB``, ``kB``, ``GB``, ``B`` (else ValueError)."""
        if unit not in SIZE_UNITS:
            raise ValueError("The unit for size based metric is one of ['MB','kB', 'GB', 'B']")
        self._record(name, value, unit, idx, dimensions, metric_type)

    def add_percent(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        self._record(name, value, "percent", idx, dimensions, metric_type)

    def add_error(self, name: str, value: float, dimensions: Sequence[Dimension] = ()) -> None:
        dims = {d.name: d.value for d in dimensions}
        dims.setdefault("Level", "Error")
        self.records.append(MetricRecord(name, value, "", MetricTypes.COUNTER, dims, None))

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: Sequence[str] = (),
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> CachingMetric:
        """Declare (or redeclare) a metric; update it through the returned object."""
        metric = CachingMetric(self, metric_name, unit, dimension_names, metric_type)
        self._cache[(metric_type, metric_name)] = metric
        return metric

    def get_metric(
        self, metric_name: str, metric_type: MetricTypes = MetricTypes.COUNTER
    ) -> CachingMetric:
        """A metric declared earlier; :class:`MetricsCacheKeyError` if there is none."""
        try:
            return self._cache[(metric_type, metric_name)]
        except KeyError:
            raise MetricsCacheKeyError(
                f"Metric of type {metric_type.value} and name {metric_name} doesn't exist"
            ) from None

    # -- helpers -------------------------------------------------------------------------

    def _record(
        self,
        name: str,
        value: float,
        unit: str,
        idx: int | None,
        dimensions: Sequence[Dimension],
        metric_type: MetricTypes,
    ) -> None:
        dims = {d.name: d.value for d in dimensions}
        dims.setdefault("ModelName", self.model_name)
        dims.setdefault("Level", "Model")
        record = MetricRecord(name, value, unit, metric_type, dims, self._request_id(idx))
        self.records.append(record)

    def _request_id(self, idx: int | None) -> str | None:
        """The id of request ``idx``, or all ids of the batch comma-joined."""
        ids = self.request_ids
        if not ids:
            return None
        if idx is not None and idx in ids:
            return ids[idx]
        return ",".join(ids.values())
