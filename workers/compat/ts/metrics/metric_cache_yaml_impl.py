"""TorchServe's ``ts.metrics.metric_cache_yaml_impl``: a metrics cache from a metrics.yaml.

Handler unit tests build one to hand to a ``Context``::

    metrics = MetricsCacheYamlImpl(config_file_path="metrics.yaml")
    metrics.initialize_cache()
    metrics.model_name = "mnist"
"""

from __future__ import annotations

import os

from control.core.metrics_schema import MetricsConfig
from workers.handling.metrics import HandlerMetrics, config_at


class MetricsCacheYamlImpl(HandlerMetrics):
    """The cache of the metrics.yaml at ``config_file_path``.

    As in TorchServe, the file is read here (raising ``MetricsConfigError`` when it
    cannot be read or is not a valid metrics configuration) and its ``model_metrics``
    are declared by :meth:`initialize_cache`.
    """

    def __init__(self, config_file_path: str | os.PathLike[str]) -> None:
        super().__init__(None, MetricsConfig(()))
        self.config_file_path = config_file_path
        self._config = config_at(os.fspath(config_file_path))

    def initialize_cache(self) -> None:
        """Declare the file's ``model_metrics``."""
        self.declare(self._config)


__all__ = ["MetricsCacheYamlImpl"]
