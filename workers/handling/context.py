"""TorchServe's handler ``Context`` and per-request ``RequestProcessor``.

Same constructor order, members and methods as ``ts/context.py``
(``docs/torchserve-compat.md#context``), so handler code (and handler unit tests that
build a Context themselves) run unchanged. The load-time part (name, manifest, system
properties, model-config.yaml) is fixed for the life of a worker;
:meth:`Context.start_batch` replaces the per-batch part (request ids and one
:class:`RequestProcessor` per request) before every batch.
"""

from __future__ import annotations

import os
from typing import Any

from workers.handling.metrics import HandlerMetrics
from workers.handling.types import ReplyStream

#: Stateful-model header names; TorchServe lets the same variables rename them.
SEQUENCE_ID_HEADER = os.environ.get("TS_REQUEST_SEQUENCE_ID", "ts_request_sequence_id")
SEQUENCE_START_HEADER = os.environ.get("TS_REQUEST_SEQUENCE_START", "ts_request_sequence_start")
SEQUENCE_END_HEADER = os.environ.get("TS_REQUEST_SEQUENCE_END", "ts_request_sequence_end")


class RequestProcessor:
    """One request's headers in, and the handler's status and headers for it out.

    Request properties are the lowercased HTTP headers plus one
    ``{param_name: {"content-type": ...}}`` entry per parameter.
    """

    def __init__(self, request_header: dict[str, Any]) -> None:
        self._request_header = request_header
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, Any] = {}

    def get_request_property(self, key: str) -> Any:
        return self._request_header.get(key)

    def get_request_properties(self) -> dict[str, Any]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = code
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: Any) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, Any]:
        return self._response_header

    def get_response_header(self, key: str) -> Any:
        return self._response_header.get(key)


class Context:
    """What a handler knows about its model and the batch it is handling."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict[str, Any] | None,
        batch_size: int,
        gpu: int | None,
        mms_version: str,
        limit_max_image_pixels: bool = True,
        metrics: HandlerMetrics | None = None,
        model_yaml_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties: dict[str, Any] = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.model_yaml_config: dict[str, Any] = model_yaml_config or {}
        self.metrics = metrics if metrics is not None else HandlerMetrics(model_name)
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] | None = None
        #: Where ``send_intermediate_predict_response`` sends this batch's pieces (the
        #: worker's, per batch of the online path; None otherwise: pieces are dropped).
        self.reply_stream: ReplyStream | None = None
        # TorchServe's backend socket and continuous-batching internals; mqserve has
        # neither (pieces go through ``reply_stream``): kept for handlers that test them.
        self.cl_socket: Any = None
        self.stopping_criteria: Any = None
        self.header_key_sequence_id = SEQUENCE_ID_HEADER
        self.header_key_sequence_start = SEQUENCE_START_HEADER
        self.header_key_sequence_end = SEQUENCE_END_HEADER

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    def start_batch(
        self,
        request_ids: dict[int, str],
        processors: list[RequestProcessor],
        reply_stream: ReplyStream | None = None,
    ) -> None:
        """Install a new batch's request ids and processors (index ``i`` is request ``i``),
        and where its intermediate replies go (None: nowhere)."""
        self.request_ids = request_ids
        self.request_processor = processors
        self.reply_stream = reply_stream
        self.metrics.set_request_ids(request_ids)

    def end_batch(self) -> None:
        """Forget the batch, so nothing of it leaks into load-time or later calls."""
        self.request_ids = None
        self.request_processor = None
        self.reply_stream = None
        self.metrics.set_request_ids(None)

    # -- requests ------------------------------------------------------------------------

    def get_request_id(self, idx: int = 0) -> str | None:
        if self.request_ids is None:
            return None
        return self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str) -> Any:
        """Header ``key`` (lowercase) of request ``idx``; None outside a batch or if absent."""
        processor = self._processor(idx)
        return None if processor is None else processor.get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        processor = self._processor(idx)
        return {} if processor is None else processor.get_request_properties()

    def get_sequence_id(self, idx: int) -> Any:
        """The stateful-model sequence id header of request ``idx``."""
        return self.get_request_header(idx, self.header_key_sequence_id)

    # -- responses -----------------------------------------------------------------------

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        """Status and reason phrase for request ``idx`` (a no-op outside a batch)."""
        processor = self._processor(idx)
        if processor is not None:
            processor.report_status(code, reason_phrase=phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self.request_processor or []:
            processor.report_status(code, reason_phrase=phrase)

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        processor = self._batch_processor(idx)
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> Any:
        return self.get_response_headers(idx).get("content-type")

    def set_response_header(self, idx: int, key: str, value: Any) -> None:
        self._batch_processor(idx).add_response_property(key, value)

    def get_response_headers(self, idx: int) -> dict[str, Any]:
        return self._batch_processor(idx).get_response_headers()

    def _processor(self, idx: int) -> RequestProcessor | None:
        processors = self.request_processor
        if processors is None or not -len(processors) <= idx < len(processors):
            return None
        return processors[idx]

    def _batch_processor(self, idx: int) -> RequestProcessor:
        if self.request_processor is None:
            raise RuntimeError("response headers exist only while a batch is handled")
        return self.request_processor[idx]
