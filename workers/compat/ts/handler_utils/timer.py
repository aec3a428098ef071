"""TorchServe's ``@timed``: time a handler method when model-config.yaml asks for it.

With ``handler: {profile: true}`` in the model config, each call of a decorated method
records ``ts_handler_<method>`` in milliseconds; otherwise the method just runs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def timed(func: F) -> F:
    """Decorate a handler method (``self.context`` must be set when it is called)."""

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _profiling(self):
            return func(self, *args, **kwargs)
        start = time.perf_counter()
        result = func(self, *args, **kwargs)
        if torch.cuda.is_available():
            # Kernels run asynchronously; wait for them so the time covers the work.
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1000
        self.context.metrics.add_time("ts_handler_" + func.__name__, elapsed_ms)
        return result

    return wrapper  # type: ignore[return-value]


def _profiling(handler: Any) -> bool:
    context = getattr(handler, "context", None)
    config = getattr(context, "model_yaml_config", None) or {}
    section = config.get("handler") if isinstance(config, dict) else None
    return isinstance(section, dict) and bool(section.get("profile"))
