"""TorchServe's ``ts.context``: the handler context and per-request processor."""

from workers.handling.context import Context, RequestProcessor

__all__ = ["Context", "RequestProcessor"]
