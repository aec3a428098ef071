"""TorchServe's ``ts.metrics.dimension``."""

from workers.handling.metrics import Dimension

__all__ = ["Dimension"]
