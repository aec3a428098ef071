"""TorchServe's ``ts.metrics.caching_metric``."""

from workers.handling.metrics import CachingMetric

__all__ = ["CachingMetric"]
