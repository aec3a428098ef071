"""TorchServe's ``ts.metrics.metric_type_enum``."""

from workers.handling.metrics import MetricTypes

__all__ = ["MetricTypes"]
