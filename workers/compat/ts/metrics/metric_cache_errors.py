"""TorchServe's ``ts.metrics.metric_cache_errors`` (the ones mqserve's cache raises)."""

from control.core.metrics_schema import MetricsConfigError
from workers.handling.metrics import (
    MetricsCacheKeyError,
    MetricsCacheTypeError,
    MetricsCacheValueError,
)

__all__ = [
    "MetricsCacheKeyError",
    "MetricsCacheTypeError",
    "MetricsCacheValueError",
    "MetricsConfigError",
]
