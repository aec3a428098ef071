"""Metrics: recording, flushing to Redis, and the page (docs/torchserve-compat.md#metrics)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.core import keys, observed
from control.core.metrics_schema import FAMILIES, format_value, series_field
from control.core.observed import WorkerRecord, WorkerState
from control.core.registry import Registry
from control.core.spec import ModelSpec
from control.metrics.recorder import Flusher, MetricsRecorder, render

HOST = "myhost"
#: The regex TorchServe's postman inference suite asserts on the page.
POSTMAN = re.compile(r'.*Requests2XX\{Level="Host",Hostname=".*",\} \d+\.\d+.*', re.DOTALL)


def spec(name: str = "m", version: str = "1.0") -> ModelSpec:
    return ModelSpec(
        model_name=name, version=version, url=f"{name}.mar", archive=f"{name}.mar",
        downloaded=False, handler="h.py",
    )  # fmt: skip


def families(page: str) -> dict[str, Any]:
    """Parsed families by name (the parser drops ``_total`` from counter names)."""
    return {f.name: f for f in text_string_to_metric_families(page)}


def samples(page: str, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one parsed family."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for s in families(page)[family].samples
    }


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate`` holds, polling (the flusher runs on its own clock)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def worker(wid: str, state: WorkerState, model: str = "m", version: str = "1.0") -> WorkerRecord:
    return WorkerRecord(
        wid=wid, model=model, version=version, host=HOST, pid=1, gpu=-1, state=state,
        started_at=0.0,
    )  # fmt: skip


@pytest.fixture
def recorder() -> MetricsRecorder:
    return MetricsRecorder(hostname=HOST)


# -- recording and flushing ---------------------------------------------------------------


def test_two_processes_sum_up(redis_client: fakeredis.FakeRedis) -> None:
    first, second = MetricsRecorder(hostname=HOST), MetricsRecorder(hostname=HOST)
    for _ in range(3):
        first.request(200)
    second.request(204)
    second.request(404)
    second.request(503)
    first.inference("noop", "default", latency_us=100.5, queue_us=10.0)
    second.inference("noop", "default", latency_us=200.0, queue_us=5.25)
    second.inference("noop", "1.0", latency_us=1.0, queue_us=1.0)
    assert first.flush(redis_client) and second.flush(redis_client)
    page = render(redis_client)

    host = (("Hostname", HOST), ("Level", "Host"))
    assert samples(page, "Requests2XX") == {("Requests2XX_total", host): 4.0}
    assert samples(page, "Requests4XX") == {("Requests4XX_total", host): 1.0}
    assert samples(page, "Requests5XX") == {("Requests5XX_total", host): 1.0}
    default = (("hostname", HOST), ("model_name", "noop"), ("model_version", "default"))
    v1 = (("hostname", HOST), ("model_name", "noop"), ("model_version", "1.0"))
    total = "ts_inference_requests_total"
    assert samples(page, "ts_inference_requests") == {(total, default): 2.0, (total, v1): 1.0}
    latency = "ts_inference_latency_microseconds_total"
    assert samples(page, "ts_inference_latency_microseconds")[latency, default] == 300.5
    queue = "ts_queue_latency_microseconds_total"
    assert samples(page, "ts_queue_latency_microseconds")[queue, default] == 15.25


def test_flush_resets_deltas(recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis) -> None:
    recorder.request(200)
    assert recorder.pending()
    assert recorder.flush(redis_client)
    assert not recorder.pending()
    assert recorder.flush(redis_client)  # nothing to add: no double counting
    assert "Requests2XX{" in render(redis_client)
    assert 'Hostname="myhost",} 1.0' in render(redis_client, {"Requests2XX"})


def test_one_pipeline_per_flush(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    recorder.request(200)
    recorder.inference("m", "default", 1.0, 1.0)
    recorder.gauge("QueueTime", 3.0, {"Level": "Host"})
    recorder.batch_size("m", "1.0", 2)
    made: list[Any] = []
    real = redis_client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real(*args, **kwargs)
        made.append((args, kwargs))
        return pipe

    redis_client.pipeline = pipeline  # type: ignore[method-assign]
    assert recorder.flush(redis_client)
    assert made == [((), {"transaction": True})]


def test_other_status_classes_are_not_counted(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    for status in (100, 301, 304, 600):
        recorder.request(status)
    assert not recorder.pending()


def test_flush_failure_keeps_deltas(
    recorder: MetricsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    recorder.request(200)
    recorder.gauge("QueueTime", 1.0, {"Level": "Host"})
    server.connected = False
    with caplog.at_level(logging.DEBUG, logger="control.metrics.recorder"):
        assert not recorder.flush(client)
        recorder.request(200)  # recorded during the outage
        recorder.gauge("QueueTime", 2.0, {"Level": "Host"})  # newer than the kept value
        assert not recorder.flush(client)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not once per flush
    assert recorder.pending()
    server.connected = True
    assert recorder.flush(client)
    page = render(client)
    assert 'Requests2XX{Level="Host",Hostname="myhost",} 2.0\n' in page
    assert 'QueueTime{Level="Host",Hostname="myhost",} 2.0\n' in page


def test_flush_never_raises_on_unexpected_errors(recorder: MetricsRecorder) -> None:
    class Broken:
        def pipeline(self, transaction: bool) -> Any:
            raise RuntimeError("boom")

    recorder.request(500)
    assert not recorder.flush(Broken())  # type: ignore[arg-type]
    assert recorder.pending()


def test_concurrent_recording_loses_nothing(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    threads, per_thread = 8, 500
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            recorder.request(200)
            recorder.inference("m", "default", 2.0, 1.0)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    while any(t.is_alive() for t in pool):
        recorder.flush(redis_client)  # flushing while others record
    for t in pool:
        t.join()
    recorder.flush(redis_client)
    page = render(redis_client, {"Requests2XX", "ts_inference_latency_microseconds"})
    assert f'Hostname="{HOST}",}} {threads * per_thread:.1f}\n' in page
    assert f'hostname="{HOST}",}} {2.0 * threads * per_thread:.1f}\n' in page


def test_gauges_last_value_wins(redis_client: fakeredis.FakeRedis) -> None:
    first, second = MetricsRecorder(hostname="a"), MetricsRecorder(hostname="a")
    labels = {"WorkerName": "W-9000-noop_1.0", "Level": "Host"}
    first.gauge("WorkerLoadTime", 4593.0, labels)
    first.flush(redis_client)
    second.gauge("WorkerLoadTime", 12.5, labels)
    second.flush(redis_client)
    first.gauge("HandlerTime", 82.93, {"ModelName": "noop", "Level": "Model"})
    first.flush(redis_client)
    page = render(redis_client, {"WorkerLoadTime", "HandlerTime"})
    assert page == (
        "# HELP WorkerLoadTime Torchserve prometheus gauge metric with unit: Milliseconds\n"
        "# TYPE WorkerLoadTime gauge\n"
        'WorkerLoadTime{WorkerName="W-9000-noop_1.0",Level="Host",Hostname="a",} 12.5\n'
        "# HELP HandlerTime Torchserve prometheus gauge metric with unit: ms\n"
        "# TYPE HandlerTime gauge\n"
        'HandlerTime{ModelName="noop",Level="Model",Hostname="a",} 82.93\n'
    )


def test_unknown_gauge_is_refused(recorder: MetricsRecorder) -> None:
    with pytest.raises(ValueError, match="unknown gauge"):
        recorder.gauge("Requests2XX", 1.0, {})
    with pytest.raises(ValueError, match="unknown gauge"):
        recorder.gauge("mqserve_queue_depth", 1.0, {})


def test_series_field_ignores_label_order() -> None:
    assert series_field({"a": "1", "b": "2"}) == series_field({"b": "2", "a": "1"})


# -- the page -----------------------------------------------------------------------------


def test_page_format_is_torchserves(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    for _ in range(8):
        recorder.request(200)
    recorder.inference("noop", "default", 290371.129, 365.21)
    recorder.gauge("QueueTime", 0.0, {"Level": "Host"})
    recorder.gauge("WorkerThreadTime", 1.0, {"Level": "Host"})
    recorder.gauge("PredictionTime", 83.13, {"ModelName": "noop", "Level": "Model"})
    recorder.flush(redis_client)
    page = render(redis_client)
    assert POSTMAN.match(page)
    lines = page.splitlines()
    assert lines[:3] == [
        "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count",
        "# TYPE Requests2XX counter",
        'Requests2XX{Level="Host",Hostname="myhost",} 8.0',
    ]
    # A family without series still has its HELP and TYPE lines, as TorchServe prints it.
    assert lines[3:7] == [
        "# HELP Requests4XX Torchserve prometheus counter metric with unit: Count",
        "# TYPE Requests4XX counter",
        "# HELP Requests5XX Torchserve prometheus counter metric with unit: Count",
        "# TYPE Requests5XX counter",
    ]
    expected = [
        "# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count",
        "# TYPE ts_inference_requests_total counter",
        'ts_inference_requests_total{model_name="noop",model_version="default",'
        'hostname="myhost",} 1.0',
        "# HELP ts_inference_latency_microseconds Torchserve prometheus counter metric with "
        "unit: Microseconds",
        "# TYPE ts_inference_latency_microseconds counter",
        'ts_inference_latency_microseconds{model_name="noop",model_version="default",'
        'hostname="myhost",} 290371.129',
        "# HELP ts_queue_latency_microseconds Torchserve prometheus counter metric with "
        "unit: Microseconds",
        "# TYPE ts_queue_latency_microseconds counter",
        'ts_queue_latency_microseconds{model_name="noop",model_version="default",'
        'hostname="myhost",} 365.21',
        "# HELP QueueTime Torchserve prometheus gauge metric with unit: Milliseconds",
        "# TYPE QueueTime gauge",
        'QueueTime{Level="Host",Hostname="myhost",} 0.0',
        "# HELP WorkerThreadTime Torchserve prometheus gauge metric with unit: Milliseconds",
        "# TYPE WorkerThreadTime gauge",
        'WorkerThreadTime{Level="Host",Hostname="myhost",} 1.0',
        "# HELP WorkerLoadTime Torchserve prometheus gauge metric with unit: Milliseconds",
        "# TYPE WorkerLoadTime gauge",
        "# HELP HandlerTime Torchserve prometheus gauge metric with unit: ms",
        "# TYPE HandlerTime gauge",
        "# HELP PredictionTime Torchserve prometheus gauge metric with unit: ms",
        "# TYPE PredictionTime gauge",
        'PredictionTime{ModelName="noop",Level="Model",Hostname="myhost",} 83.13',
    ]
    assert lines[7 : 7 + len(expected)] == expected
    helps = [line for line in lines if line.startswith("# HELP mqserve_")]
    types = [line for line in lines if line.startswith("# TYPE mqserve_")]
    assert [h.split()[2] for h in helps] == [
        "mqserve_queue_depth",
        "mqserve_batch_queue_depth",
        "mqserve_workers",
        "mqserve_batch_size",
    ]
    assert types == [
        "# TYPE mqserve_queue_depth gauge",
        "# TYPE mqserve_batch_queue_depth gauge",
        "# TYPE mqserve_workers gauge",
        "# TYPE mqserve_batch_size histogram",
    ]
    assert page.endswith("\n")
    assert len(families(page)) == len(FAMILIES)


def test_empty_page_lists_every_family(redis_client: fakeredis.FakeRedis) -> None:
    page = render(redis_client)
    assert [line.split()[2] for line in page.splitlines() if line.startswith("# TYPE")] == [
        f.name for f in FAMILIES
    ]
    assert all(line.startswith("#") for line in page.splitlines())


@pytest.mark.parametrize(
    "names",
    [
        {"ts_queue_latency_microseconds"},
        {"ts_inference_latency_microseconds", "ts_queue_latency_microseconds"},
        {"Requests2XX", "mqserve_queue_depth"},
    ],
)
def test_name_filter(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis, names: set[str]
) -> None:
    recorder.request(200)
    recorder.inference("noop", "default", 1.0, 2.0)
    recorder.flush(redis_client)
    Registry(redis_client).register(spec(), 1, 1)
    page = render(redis_client, names)
    assert {line.split()[2] for line in page.splitlines() if line.startswith("# TYPE")} == names
    assert {line.split("{")[0] for line in page.splitlines() if not line.startswith("#")} == names


def test_unknown_or_blank_names_give_an_empty_page(redis_client: fakeredis.FakeRedis) -> None:
    assert render(redis_client, {"nope"}) == ""
    assert render(redis_client, {""}) == ""
    assert render(redis_client, set()) == ""


def test_queue_depth_and_workers_by_state(redis_client: fakeredis.FakeRedis) -> None:
    registry = Registry(redis_client)
    registry.register(spec("m", "1.0"), 1, 1)
    registry.register(spec("m", "2.0"), 1, 1)
    for i in range(3):
        redis_client.lpush(keys.online_queue("m", "1.0"), f"frame-{i}")
    redis_client.lpush(keys.batch_queue("m", "1.0"), "task")
    redis_client.lpush(keys.online_queue("unregistered", "1.0"), "ignored")
    observed.publish(redis_client, worker("9000", WorkerState.READY), ttl=60)
    observed.publish(redis_client, worker("9001", WorkerState.READY), ttl=60)
    observed.publish(redis_client, worker("9002", WorkerState.LOADING), ttl=60)
    observed.publish(redis_client, worker("9003", WorkerState.BUSY, version="2.0"), ttl=60)

    page = render(
        redis_client, {"mqserve_queue_depth", "mqserve_batch_queue_depth", "mqserve_workers"}
    )
    # The online queue (describe's pendingRequests) and the batch queue, never mixed.
    assert page.splitlines()[2:4] == [
        'mqserve_queue_depth{model_name="m",model_version="1.0",} 3.0',
        'mqserve_queue_depth{model_name="m",model_version="2.0",} 0.0',
    ]
    assert page.splitlines()[6:8] == [
        'mqserve_batch_queue_depth{model_name="m",model_version="1.0",} 1.0',
        'mqserve_batch_queue_depth{model_name="m",model_version="2.0",} 0.0',
    ]
    workers = samples(page, "mqserve_workers")
    by_state = {
        (dict(labels)["model_version"], dict(labels)["state"]): value
        for (_, labels), value in workers.items()
    }
    assert len(by_state) == 2 * len(WorkerState)  # every state, zeros included
    assert {k: v for k, v in by_state.items() if v} == {
        ("1.0", "READY"): 2.0,
        ("1.0", "LOADING"): 1.0,
        ("2.0", "BUSY"): 1.0,
    }
    assert 'mqserve_workers{model_name="m",model_version="1.0",state="READY",} 2.0\n' in page


def test_batch_size_histogram_is_cumulative(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    for n in (1, 1, 3, 8, 9, 200):
        recorder.batch_size("m", "1.0", n)
    other = MetricsRecorder(hostname="other")
    other.batch_size("m", "1.0", 2)
    recorder.flush(redis_client)
    other.flush(redis_client)
    page = render(redis_client, {"mqserve_batch_size"})
    series = 'model_name="m",model_version="1.0",'
    assert page.splitlines()[2:] == [
        f'mqserve_batch_size_bucket{{{series}le="1.0",}} 2.0',
        f'mqserve_batch_size_bucket{{{series}le="2.0",}} 3.0',
        f'mqserve_batch_size_bucket{{{series}le="4.0",}} 4.0',
        f'mqserve_batch_size_bucket{{{series}le="8.0",}} 5.0',
        f'mqserve_batch_size_bucket{{{series}le="16.0",}} 6.0',
        f'mqserve_batch_size_bucket{{{series}le="32.0",}} 6.0',
        f'mqserve_batch_size_bucket{{{series}le="64.0",}} 6.0',
        f'mqserve_batch_size_bucket{{{series}le="128.0",}} 6.0',
        f'mqserve_batch_size_bucket{{{series}le="+Inf",}} 7.0',
        f"mqserve_batch_size_count{{{series}}} 7.0",
        f"mqserve_batch_size_sum{{{series}}} 224.0",
    ]
    parsed = families(page)["mqserve_batch_size"]
    assert parsed.type == "histogram"
    buckets = [s.value for s in parsed.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)


def test_label_values_are_escaped(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    recorder.gauge("HandlerTime", 1.0, {"ModelName": 'a"b\\c\nd', "Level": "Model"})
    recorder.flush(redis_client)
    page = render(redis_client, {"HandlerTime"})
    assert 'ModelName="a\\"b\\\\c\\nd"' in page
    parsed = families(page)["HandlerTime"].samples[0]
    assert parsed.labels["ModelName"] == 'a"b\\c\nd'


def test_render_reads_bytes_clients(recorder: MetricsRecorder) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())  # no decode_responses
    recorder.request(200)
    recorder.batch_size("m", "1.0", 4)
    recorder.flush(client)
    Registry(client).register(spec(), 1, 1)
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    page = render(client)
    assert POSTMAN.match(page)
    assert 'mqserve_batch_size_count{model_name="m",model_version="1.0",} 1.0' in page
    assert 'state="READY",} 1.0' in page


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (8, "8.0"),
        (0.0, "0.0"),
        (290371.129, "290371.129"),
        (0.001, "0.001"),
        (1e-4, "1.0E-4"),
        (1.5e-5, "1.5E-5"),
        (1e7, "1.0E7"),
        (12345678.9, "1.23456789E7"),
        (-2.5e9, "-2.5E9"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_values_are_written_as_java_doubles(value: float, text: str) -> None:
    assert format_value(value) == text
    assert re.fullmatch(r"\d+\.\d+.*", text) or not text[0].isdigit()


# -- the flusher --------------------------------------------------------------------------


def test_flusher_flushes_periodically_and_on_stop(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis
) -> None:
    flusher = recorder.start_flusher(redis_client, interval=0.01)
    try:
        recorder.request(200)
        eventually(lambda: redis_client.exists(keys.metrics("Requests2XX")) == 1)
    finally:
        flusher.stop()
    slow = recorder.start_flusher(redis_client, interval=3600)
    recorder.request(200)
    slow.stop()  # the last flush happens on stop, not an hour later
    assert not recorder.pending()
    assert 'Hostname="myhost",} 2.0' in render(redis_client, {"Requests2XX"})


def test_flusher_rides_out_an_outage_on_the_same_client(recorder: MetricsRecorder) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    server.connected = False  # Redis is down when the flusher starts
    flusher = recorder.start_flusher(client, interval=0.01)
    try:
        recorder.request(404)
        eventually(lambda: recorder._failing)  # a flush failed: deltas kept, nothing raised
        assert recorder.pending() and flusher._thread.is_alive()
        server.connected = True
        eventually(lambda: not recorder.pending())
    finally:
        flusher.stop()
    assert 'Requests4XX{Level="Host",Hostname="myhost",} 1.0' in render(client)


def test_flusher_is_a_daemon_registered_at_exit(
    recorder: MetricsRecorder, redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[Any] = []
    unregistered: list[Any] = []
    monkeypatch.setattr("control.metrics.recorder.atexit.register", registered.append)
    monkeypatch.setattr("control.metrics.recorder.atexit.unregister", unregistered.append)
    flusher = recorder.start_flusher(redis_client, interval=3600)
    assert isinstance(flusher, Flusher)
    assert [t for t in threading.enumerate() if t.name == "metrics-flusher" and t.daemon]
    assert registered == [flusher.stop]
    flusher.stop()
    assert unregistered == [flusher.stop]
