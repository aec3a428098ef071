"""Handler metrics: the ``context.metrics`` cache TorchServe handlers write to.

It behaves as TorchServe 0.12's backend ``MetricsCacheYamlImpl`` (``ts/metrics/``): the
metrics.yaml's ``model_metrics`` are declared when the cache is made, and

* ``get_metric(name, type)`` returns a declared metric and raises
  :class:`MetricsCacheKeyError` for one that nobody declared (whatever
  ``model_metrics_auto_detect`` says: that setting decides what the page shows, see
  :class:`control.metrics.recorder.ModelMetrics`);
* ``add_metric_to_cache`` declares (or redeclares) a metric and returns it;
* ``add_metric``, ``add_counter``, ``add_time``, ``add_size``, ``add_percent`` update
  a metric, declaring it first when it is new, with the dimensions given plus
  ``ModelName`` and ``Level: Model`` unless given (``add_error``: ``Level: Error``).

A metric is keyed by type and name. An update's dimension values pair up in order with
the metric's dimension names. What TorchServe's ``CachingMetric.add_or_update`` logs
and drops is logged and dropped here too (a count of values other than the names', a
negative counter increment), and so is a value that is not a finite number or a metric
type that is none of :class:`MetricTypes`: a handler's metric never fails a request.

Where TorchServe logs each update for its frontend, every update here is appended to
:attr:`HandlerMetrics.records`; the worker takes them with
:meth:`HandlerMetrics.drain` after the load and after each batch.
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from control.core.metrics_schema import MetricsConfig, load_metrics_config

logger = logging.getLogger(__name__)

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

    def to_dict(self) -> dict[str, str]:
        return {"Name": self.name, "Value": self.value}


@dataclass(frozen=True)
class MetricRecord:
    """One metric update as a handler or the service made it."""

    name: str
    value: float
    unit: str
    metric_type: MetricTypes
    #: Dimension name -> value, in the metric's dimension order.
    dimensions: dict[str, str]
    #: The request the update belongs to; several ids comma-joined, None outside a batch.
    request_id: str | None


class MetricsCacheKeyError(KeyError):
    """``get_metric`` was asked for a metric nobody declared."""


class MetricsCacheTypeError(TypeError):
    """A metric was declared with a name, unit or dimension names of the wrong type."""


class MetricsCacheValueError(ValueError):
    """A metric API was called with a value it does not accept (e.g. a time unit)."""


def as_metric_type(value: object) -> MetricTypes | None:
    """``value`` as a :class:`MetricTypes`, or None when it names no metric type.

    Accepts the members, their values or names as strings (any case), and enum members
    of another ``MetricTypes`` (a real TorchServe's) by their value.
    """
    if isinstance(value, MetricTypes):
        return value
    text = getattr(value, "value", value)
    if not isinstance(text, str):
        return None
    try:
        return MetricTypes(text.lower())
    except ValueError:
        return None


def _number(value: object) -> float | None:
    """``value`` as a float if it is a finite real number (bool is not one), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class CachingMetric:
    """A declared metric that handler code updates (TorchServe's ``CachingMetric``).

    ``metric_type`` is None for a metric declared with a type that is none of
    :class:`MetricTypes`: it is not in the cache, and its updates are logged and dropped.
    """

    def __init__(
        self,
        recorder: HandlerMetrics,
        name: str,
        unit: str,
        dimension_names: Sequence[str],
        metric_type: MetricTypes | None,
    ) -> None:
        self._recorder = recorder
        self.metric_name = name
        self.unit = unit
        self.dimension_names = list(dimension_names)
        self.metric_type = metric_type

    def add_or_update(
        self,
        value: float,
        dimension_values: Sequence[Any] = (),
        request_id: str = "",
    ) -> None:
        """Record ``value``; ``dimension_values`` pair up in order with the names.

        Logs and drops the update when the metric's type is unknown, the number of values
        differs from the number of names, the value is not a finite number, or a counter
        would decrease.
        """
        values = [] if dimension_values is None else list(dimension_values)
        number = _number(value)
        if self.metric_type is None:
            reason = "its metric type is not counter, gauge or histogram"
        elif len(values) != len(self.dimension_names):
            reason = (
                f"Dimension values: {values} should correspond to Dimension names: "
                f"{self.dimension_names}"
            )
        elif number is None:
            reason = "the value is not a finite number"
        elif self.metric_type is MetricTypes.COUNTER and number < 0:
            reason = "Counter metric update value cannot be negative"
        else:
            dims = dict(zip(self.dimension_names, (str(v) for v in values), strict=True))
            record = MetricRecord(
                self.metric_name, number, self.unit, self.metric_type, dims, request_id or None
            )
            self._recorder.records.append(record)
            return
        logger.error(
            "[METRICS]Failed to update metric with name:%s and dimensions: %s with value: %r: %s",
            self.metric_name,
            values,
            value,
            reason,
        )

    def update(
        self,
        value: float,
        request_id: str = "",
        dimensions: Sequence[Dimension] = (),
    ) -> None:
        """Older TorchServe spelling: the dimensions' names replace the metric's, as there."""
        self.dimension_names = [d.name for d in dimensions]
        self.add_or_update(value, [d.value for d in dimensions], request_id)


class HandlerMetrics:
    """``context.metrics``: TorchServe's metrics cache, recording every update.

    ``config`` supplies the metrics declared up front (its ``model_metrics``); None
    means mqserve's default metrics.yaml (TorchServe's). :attr:`records` holds the
    updates made since the last :meth:`drain`, oldest first.
    """

    def __init__(self, model_name: str | None = None, config: MetricsConfig | None = None) -> None:
        self.model_name = model_name
        self.records: list[MetricRecord] = []
        #: ``{batch index: request id}`` of the batch being handled, None between batches.
        self.request_ids: dict[int, str] | None = None
        #: TorchServe's layout: metric type -> metric name -> metric.
        self.cache: dict[MetricTypes, dict[str, CachingMetric]] = {}
        self.declare(default_config() if config is None else config)

    def declare(self, config: MetricsConfig) -> None:
        """Declare each ``model_metrics`` entry (TorchServe's ``initialize_cache``)."""
        for spec in config.model_metrics:
            self.add_metric_to_cache(
                spec.name, spec.unit, list(spec.dimensions), MetricTypes(spec.kind.value)
            )

    def set_request_ids(self, request_ids: dict[int, str] | None) -> None:
        self.request_ids = request_ids

    def drain(self) -> list[MetricRecord]:
        """Return the records made since the last drain and forget them."""
        records, self.records = self.records, []
        return records

    def cache_keys(self) -> list[str]:
        """``type:name`` of every declared metric (TorchServe's testing helper)."""
        return [f"{kind.value}:{name}" for kind, metrics in self.cache.items() for name in metrics]

    # -- TorchServe's metrics cache API --------------------------------------------------

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: Sequence[str] = (),
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> CachingMetric:
        """Declare (or redeclare, replacing) a metric; update it through the returned object.

        Raises :class:`MetricsCacheTypeError` when the name or unit is not a string or the
        dimension names are not a list of strings, as TorchServe does. An unknown
        ``metric_type`` is logged; the metric returned drops its updates.
        """
        if not isinstance(metric_name, str):
            raise MetricsCacheTypeError("`metric_name` must be a str")
        if not isinstance(unit, str):
            raise MetricsCacheTypeError("`unit` must be a str")
        names = list(dimension_names or [])
        if not isinstance(dimension_names or [], list | tuple) or not all(
            isinstance(n, str) for n in names
        ):
            raise MetricsCacheTypeError(
                "`dimension_names` should be a list of dimension name strings"
            )
        kind = as_metric_type(metric_type)
        metric = CachingMetric(self, metric_name, unit, names, kind)
        if kind is None:
            logger.error(
                "[METRICS]metric %s has the unknown type %r; its updates are dropped",
                metric_name,
                metric_type,
            )
            return metric
        if metric_name in self.cache.setdefault(kind, {}):
            logger.debug("Overriding existing key %s:%s", kind.value, metric_name)
        self.cache[kind][metric_name] = metric
        return metric

    def get_metric(
        self, metric_name: str, metric_type: MetricTypes = MetricTypes.COUNTER
    ) -> CachingMetric:
        """The metric declared with this name and type; :class:`MetricsCacheKeyError` if none."""
        kind = as_metric_type(metric_type)
        metric = self.cache.get(kind, {}).get(metric_name) if kind is not None else None
        if metric is None:
            raise MetricsCacheKeyError(
                f"Metric of type '{metric_type}' and name '{metric_name}' doesn't exist"
            )
        return metric

    def add_metric(
        self,
        name: str,
        value: float,
        unit: str,
        idx: int | None = None,
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.COUNTER,
    ) -> None:
        """Update metric ``name`` with any unit (a counter unless ``metric_type`` says)."""
        self._update(name, value, unit, idx, dimensions, metric_type)

    def add_counter(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        dimensions: Sequence[Dimension] = (),
    ) -> None:
        """Add ``value`` to counter ``name`` (unit ``count``)."""
        self._update(name, value, "count", idx, dimensions, MetricTypes.COUNTER)

    def add_time(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        unit: str = "ms",
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        """Record a duration; ``unit`` must be ``ms`` or ``s`` (MetricsCacheValueError)."""
        if unit not in TIME_UNITS:
            raise MetricsCacheValueError("the unit for a timed metric should be one of ['ms', 's']")
        self._update(name, value, unit, idx, dimensions, metric_type)

    def add_size(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        unit: str = "MB",
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        """Record a size; ``unit`` is ``MB``, ``kB``, ``GB`` or ``B`` (else ValueError)."""
        if unit not in SIZE_UNITS:
            raise ValueError("The unit for size based metric is one of ['MB','kB', 'GB', 'B']")
        self._update(name, value, unit, idx, dimensions, metric_type)

    def add_percent(
        self,
        name: str,
        value: float,
        idx: int | None = None,
        dimensions: Sequence[Dimension] = (),
        metric_type: MetricTypes = MetricTypes.GAUGE,
    ) -> None:
        """Record a percentage (unit ``percent``)."""
        self._update(name, value, "percent", idx, dimensions, metric_type)

    def add_error(self, name: str, value: float, dimensions: Sequence[Dimension] = ()) -> None:
        """Count an error: a counter with ``Level: Error`` unless a Level is given."""
        dims = list(dimensions)
        if "Level" not in [d.name for d in dims]:
            dims.append(Dimension("Level", "Error"))
        metric = self._get_or_add(name, "", dims, MetricTypes.COUNTER)
        metric.add_or_update(value, [d.value for d in dims])

    # -- helpers -------------------------------------------------------------------------

    def _update(
        self,
        name: str,
        value: float,
        unit: str,
        idx: int | None,
        dimensions: Sequence[Dimension],
        metric_type: MetricTypes,
    ) -> None:
        """TorchServe's ``add_*`` path: default dimensions, then get-or-declare, then update."""
        kind = as_metric_type(metric_type)
        if kind is None:
            logger.error("[METRICS]metric %s has the unknown type %r; dropped", name, metric_type)
            return
        dims = list(dimensions)
        given = [d.name for d in dims]
        # TorchServe adds these for every update made at load or in a batch (its request
        # ids are set then); between batches nothing runs.
        if "ModelName" not in given:
            dims.append(Dimension("ModelName", str(self.model_name)))
        if "Level" not in given:
            dims.append(Dimension("Level", "Model"))
        request_id = self._request_id(idx)
        metric = self._get_or_add(name, unit, dims, kind)
        metric.add_or_update(value, [d.value for d in dims], request_id or "")

    def _get_or_add(
        self, name: str, unit: str, dimensions: list[Dimension], kind: MetricTypes
    ) -> CachingMetric:
        try:
            return self.get_metric(name, kind)
        except MetricsCacheKeyError:
            return self.add_metric_to_cache(name, unit, [d.name for d in dimensions], kind)

    def _request_id(self, idx: int | None) -> str | None:
        """The id of request ``idx``, or all ids of the batch comma-joined."""
        ids = self.request_ids
        if not ids:
            return None
        if idx is not None and idx in ids:
            return ids[idx]
        return ",".join(ids.values())


@cache
def default_config() -> MetricsConfig:
    """The default metrics.yaml's configuration, read once per process."""
    return load_metrics_config(None)


def config_at(path: str | Path | None) -> MetricsConfig:
    """The configuration of the metrics.yaml at ``path`` (None: the default one).

    Raises ``control.core.metrics_schema.MetricsConfigError``.
    """
    return default_config() if path is None else load_metrics_config(Path(path))
