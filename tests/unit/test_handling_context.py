"""The TorchServe Context, RequestProcessor and metrics API (docs/torchserve-compat.md#context)."""

from __future__ import annotations

import pytest

from workers.handling import Context, HandlerMetrics, RequestProcessor
from workers.handling.metrics import Dimension, MetricsCacheKeyError, MetricTypes


def _context(metrics: HandlerMetrics | None = None) -> Context:
    return Context("m", "/models/m", {"model": {}}, 2, None, "0.12.0", True, metrics)


def _batch(context: Context) -> list[RequestProcessor]:
    processors = [
        RequestProcessor({"x-a": "1", "body": {"content-type": "text/plain"}}),
        RequestProcessor({"ts_request_sequence_id": "seq-1"}),
    ]
    context.start_batch({0: "id0", 1: "id1"}, processors)
    return processors


def test_positional_constructor_as_upstream() -> None:
    context = Context("m", "/d", None, 4, 1, "0.12.0")
    assert context.system_properties["gpu_id"] == 1
    assert context.model_yaml_config == {}
    assert isinstance(context.metrics, HandlerMetrics)


def test_requests() -> None:
    context = _context()
    assert context.get_request_id() is None
    assert context.get_request_header(0, "x-a") is None
    _batch(context)
    assert context.get_request_id() == "id0"
    assert context.get_request_id(1) == "id1"
    assert context.get_request_header(0, "x-a") == "1"
    assert context.get_request_header(0, "missing") is None
    assert context.get_request_header(5, "x-a") is None
    assert context.get_all_request_header(0)["body"] == {"content-type": "text/plain"}
    assert context.get_sequence_id(1) == "seq-1"
    assert context.request_processor is not None
    assert context.request_processor[0].get_request_property("x-a") == "1"


def test_responses() -> None:
    context = _context()
    context.set_response_status(500)  # outside a batch: ignored, as upstream
    processors = _batch(context)
    context.set_response_status(404, "Not here", 1)
    context.set_response_content_type(0, "application/json")
    context.set_response_header(0, "x-b", "2")
    assert context.get_response_status(0) == (200, None)
    assert context.get_response_status(1) == (404, "Not here")
    assert context.get_response_content_type(0) == "application/json"
    assert context.get_response_content_type(1) is None
    assert context.get_response_headers(0) == {"content-type": "application/json", "x-b": "2"}
    assert processors[0].get_response_header("x-b") == "2"
    context.set_all_response_status(503, "busy")
    assert [(p.get_response_status_code(), p.get_response_status_phrase()) for p in processors] == [
        (503, "busy")
    ] * 2


def test_request_processor_reporting() -> None:
    processor = RequestProcessor({"k": "v"})
    assert processor.get_request_properties() == {"k": "v"}
    processor.report_status(201, "Created")
    processor.add_response_property("x", "y")
    assert processor.get_response_status_code() == 201
    assert processor.get_response_status_phrase() == "Created"
    assert processor.get_response_headers() == {"x": "y"}


def test_end_batch_forgets_requests() -> None:
    context = _context()
    _batch(context)
    context.end_batch()
    assert (context.request_ids, context.request_processor) == (None, None)
    with pytest.raises(RuntimeError):
        context.get_response_headers(0)


def test_metrics_api_records_updates() -> None:
    metrics = HandlerMetrics("m")
    context = _context(metrics)
    _batch(context)
    metrics.add_time("HandlerTime", 1.5, None, "ms")
    metrics.add_counter("Hits", 1, 1, [Dimension("Route", "a")])
    metrics.add_size("Payload", 2, 0, "kB")
    metrics.add_percent("Usage", 50)
    metrics.add_metric("Custom", 3, "things", metric_type=MetricTypes.GAUGE)
    metrics.add_error("Oops", 1)
    records = metrics.drain()
    assert [(r.name, r.value, r.unit, r.metric_type) for r in records] == [
        ("HandlerTime", 1.5, "ms", MetricTypes.GAUGE),
        ("Hits", 1, "count", MetricTypes.COUNTER),
        ("Payload", 2, "kB", MetricTypes.GAUGE),
        ("Usage", 50, "percent", MetricTypes.GAUGE),
        ("Custom", 3, "things", MetricTypes.GAUGE),
        ("Oops", 1, "", MetricTypes.COUNTER),
    ]
    assert [r.request_id for r in records] == ["id0,id1", "id1", "id0", "id0,id1", "id0,id1", None]
    assert records[1].dimensions == {"Route": "a", "ModelName": "m", "Level": "Model"}
    assert records[5].dimensions == {"Level": "Error"}
    assert metrics.drain() == []


def test_metrics_units_are_checked() -> None:
    metrics = HandlerMetrics("m")
    with pytest.raises(ValueError, match="timed metric"):
        metrics.add_time("T", 1, unit="h")
    with pytest.raises(ValueError, match="size based"):
        metrics.add_size("S", 1, unit="TB")


def test_cached_metrics() -> None:
    metrics = HandlerMetrics("m")
    with pytest.raises(MetricsCacheKeyError):
        metrics.get_metric("Loads")
    declared = metrics.add_metric_to_cache("Loads", "count", ["Stage"])
    assert metrics.get_metric("Loads") is declared
    declared.add_or_update(2, ["warm"], request_id="r9")
    metrics.get_metric("Loads").update(3, dimensions=[Dimension("Stage", "cold")])
    gauge = metrics.add_metric_to_cache("Temp", "C", metric_type=MetricTypes.GAUGE)
    gauge.add_or_update(36.6)
    assert [(r.name, r.value, r.dimensions, r.request_id) for r in metrics.drain()] == [
        ("Loads", 2, {"Stage": "warm"}, "r9"),
        ("Loads", 3, {"Stage": "cold"}, None),
        ("Temp", 36.6, {}, None),
    ]
    with pytest.raises(MetricsCacheKeyError):
        metrics.get_metric("Temp")  # declared as a gauge, not a counter
