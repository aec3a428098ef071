"""The model-handling layer of a worker process: plain Python, no Celery, no Redis.

A worker unpacks the archive, calls :func:`enter_model_dir` and :func:`load_handler`
once, then :meth:`LoadedModel.handle` per batch. Handlers written for TorchServe run
unchanged: ``import ts`` resolves to the compatibility package in ``workers/compat``
(see :func:`install_compat_path`) unless TorchServe itself is installed.
"""

from workers.handling.compat import install_compat_path
from workers.handling.context import Context, RequestProcessor
from workers.handling.loader import LoadError, enter_model_dir, load_handler
from workers.handling.metrics import HandlerMetrics, MetricRecord
from workers.handling.service import LoadedModel
from workers.handling.types import HandlerFailure, InferenceReply, InferenceRequest, Parameter

__all__ = [
    "Context",
    "HandlerFailure",
    "HandlerMetrics",
    "InferenceReply",
    "InferenceRequest",
    "LoadError",
    "LoadedModel",
    "MetricRecord",
    "Parameter",
    "RequestProcessor",
    "enter_model_dir",
    "install_compat_path",
    "load_handler",
]
