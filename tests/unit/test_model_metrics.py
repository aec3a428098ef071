"""Handler metrics on the metrics page: which records are exported, how they aggregate over
worker processes through Redis, and how the page shows them (docs/torchserve-compat.md#metrics).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from control.core import keys
from control.core.metrics_schema import DEFAULT_BUCKETS, Kind, MetricsConfig, MetricSpec
from control.core.settings import Settings, SettingsError, apply_properties
from control.metrics.recorder import MetricsRecorder, ModelMetrics, render

HOST = "myhost"
CONFIG = MetricsConfig(
    (
        MetricSpec("InferenceRequestCount", Kind.COUNTER, "count", ()),
        MetricSpec("PredictedLabelCount", Kind.COUNTER, "count", ("Label", "ModelName", "Level")),
        MetricSpec("RequestBatchSize", Kind.GAUGE, "count", ("ModelName",)),
        MetricSpec("TopProbability", Kind.HISTOGRAM, "ratio", ("ModelName", "Level")),
        MetricSpec("HandlerTime", Kind.GAUGE, "ms", ("ModelName", "Level")),
    )
)


@dataclass(frozen=True)
class Record:
    """A handler metric record, as ``workers.handling.metrics.MetricRecord`` has it."""

    name: str
    value: Any
    metric_type: str = "counter"
    dimensions: dict[str, str] = field(default_factory=dict)
    unit: str = "count"


def model_dims(**extra: str) -> dict[str, str]:
    return {**extra, "ModelName": "m", "Level": "Model"}


def worker(auto_detect: bool = False, config: MetricsConfig = CONFIG) -> ModelMetrics:
    return ModelMetrics(MetricsRecorder(hostname=HOST), config, auto_detect)


def flush(*exporters: ModelMetrics, client: redis.Redis) -> None:
    for exporter in exporters:
        assert exporter._recorder.flush(client)


def lines(page: str, family: str) -> list[str]:
    """The page's lines of one family, HELP and TYPE first."""
    return [
        line
        for line in page.splitlines()
        if line.split("{")[0].split(" ")[0] in (family, f"{family}_bucket", f"{family}_count",
                                                 f"{family}_sum")
        or line.startswith((f"# HELP {family} ", f"# TYPE {family} "))
    ]  # fmt: skip


def parsed(page: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(page)}


# -- what is exported ---------------------------------------------------------------------


def test_declared_families_show_before_any_series(redis_client: fakeredis.FakeRedis) -> None:
    flush(worker(), client=redis_client)
    page = render(redis_client)
    assert lines(page, "RequestBatchSize") == [
        "# HELP RequestBatchSize Torchserve prometheus gauge metric with unit: count",
        "# TYPE RequestBatchSize gauge",
    ]
    assert lines(page, "TopProbability") == [
        "# HELP TopProbability Torchserve prometheus histogram metric with unit: ratio",
        "# TYPE TopProbability histogram",
    ]
    # HandlerTime is a built-in family: shown once, in its built-in place.
    assert page.count("# TYPE HandlerTime gauge") == 1
    assert "HandlerTime" not in redis_client.hgetall(keys.METRIC_FAMILIES)
    model_part = page[page.index("# HELP mqserve_batch_size") :]
    order = [line.split()[2] for line in model_part.splitlines() if line.startswith("# TYPE")]
    assert order == [
        "mqserve_batch_size",
        "InferenceRequestCount",
        "PredictedLabelCount",
        "RequestBatchSize",
        "TopProbability",
    ]


def test_two_workers_aggregate_through_redis(redis_client: fakeredis.FakeRedis) -> None:
    first, second = worker(), worker()
    for exporter, label, batch in ((first, "above", 2), (second, "below", 3)):
        exporter.record_all(
            [
                Record("InferenceRequestCount", batch),
                Record("PredictedLabelCount", 1, dimensions=model_dims(Label=label)),
                Record("PredictedLabelCount", 1, dimensions=model_dims(Label="above")),
                Record("RequestBatchSize", batch, "gauge", {"ModelName": "m"}),
                Record("TopProbability", 0.5, "histogram", model_dims()),  # le="0.5"
                Record("TopProbability", 0.75, "histogram", model_dims()),  # le="0.75"
                Record("HandlerTime", 10.0 * batch, "gauge", model_dims(), "ms"),
            ]
        )
        flush(exporter, client=redis_client)
    page = render(redis_client)
    assert lines(page, "InferenceRequestCount")[2:] == [
        'InferenceRequestCount{Hostname="myhost",} 5.0'
    ]
    assert lines(page, "PredictedLabelCount")[2:] == [
        'PredictedLabelCount{Label="above",ModelName="m",Level="Model",Hostname="myhost",} 3.0',
        'PredictedLabelCount{Label="below",ModelName="m",Level="Model",Hostname="myhost",} 1.0',
    ]
    # Gauges: the last writer wins.
    assert lines(page, "RequestBatchSize")[2:] == [
        'RequestBatchSize{ModelName="m",Hostname="myhost",} 3.0'
    ]
    assert lines(page, "HandlerTime")[2:] == [
        'HandlerTime{ModelName="m",Level="Model",Hostname="myhost",} 30.0'
    ]
    histogram = lines(page, "TopProbability")[2:]
    labels = 'ModelName="m",Level="Model",Hostname="myhost",'
    bounds = [*(repr(b) for b in DEFAULT_BUCKETS), "+Inf"]
    cumulative = [0.0] * 7 + [2.0] + [4.0] * 7
    assert histogram == [
        *(f'TopProbability_bucket{{{labels}le="{b}",}} {c}' for b, c in zip(bounds, cumulative,
                                                                            strict=True)),
        f"TopProbability_count{{{labels}}} 4.0",
        f"TopProbability_sum{{{labels}}} 2.5",
    ]  # fmt: skip
    families = parsed(page)
    assert families["InferenceRequestCount"].type == "counter"
    assert families["RequestBatchSize"].type == "gauge"
    assert families["TopProbability"].type == "histogram"


def test_undeclared_metrics_are_dropped_without_auto_detect(
    redis_client: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = worker(auto_detect=False)
    with caplog.at_level(logging.WARNING, "control.metrics.recorder"):
        assert not exporter.record(Record("ModelSize", 5.6, "gauge", model_dims(), "kB"))
        assert not exporter.record(Record("ModelSize", 5.7, "gauge", model_dims(), "kB"))
    assert caplog.text.count("metric ModelSize dropped: not in the metrics config") == 1
    flush(exporter, client=redis_client)
    assert "ModelSize" not in render(redis_client)


def test_auto_detect_registers_from_the_record(redis_client: fakeredis.FakeRedis) -> None:
    exporter = worker(auto_detect=True)
    assert exporter.record(Record("ModelSize", 5.5, "gauge", model_dims(), "kB"))
    assert exporter.record(Record("HandlerMethodTime", 2.0, "gauge",
                                  model_dims(MethodName="pre"), "ms"))  # fmt: skip
    flush(exporter, client=redis_client)
    page = render(redis_client)
    assert lines(page, "ModelSize") == [
        "# HELP ModelSize Torchserve prometheus gauge metric with unit: Kilobytes",
        "# TYPE ModelSize gauge",
        'ModelSize{ModelName="m",Level="Model",Hostname="myhost",} 5.5',
    ]
    assert lines(page, "HandlerMethodTime")[0].endswith("with unit: Milliseconds")
    assert lines(page, "HandlerMethodTime")[2] == (
        'HandlerMethodTime{MethodName="pre",ModelName="m",Level="Model",Hostname="myhost",} 2.0'
    )


def test_first_auto_detection_wins_declarations_overwrite(
    redis_client: fakeredis.FakeRedis,
) -> None:
    first, second = worker(auto_detect=True), worker(auto_detect=True)
    first.record(Record("Calls", 1, dimensions={"A": "x"}))
    flush(first, client=redis_client)
    second.record(Record("Calls", 1, "gauge", dimensions={"B": "y"}))
    flush(second, client=redis_client)
    entry = json.loads(redis_client.hget(keys.METRIC_FAMILIES, "Calls") or "")
    assert (entry["kind"], entry["labels"]) == ("counter", ["A", "Hostname"])
    # A worker whose metrics.yaml declares the name sets the stack's definition.
    declared = MetricsConfig((MetricSpec("Calls", Kind.GAUGE, "n", ("B",)),))
    flush(worker(config=declared), client=redis_client)
    entry = json.loads(redis_client.hget(keys.METRIC_FAMILIES, "Calls") or "")
    assert (entry["kind"], entry["labels"]) == ("gauge", ["B", "Hostname"])


def test_a_declared_family_keeps_its_type_whatever_the_record_says(
    redis_client: fakeredis.FakeRedis,
) -> None:
    exporter = worker()
    # add_counter on a name the yaml declares as a gauge: the frontend sets the gauge.
    exporter.record(Record("RequestBatchSize", 4, "counter", {"ModelName": "m"}))
    exporter.record(Record("RequestBatchSize", 2, "counter", {"ModelName": "m"}))
    flush(exporter, client=redis_client)
    assert lines(render(redis_client), "RequestBatchSize")[2:] == [
        'RequestBatchSize{ModelName="m",Hostname="myhost",} 2.0'
    ]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Record("RequestBatchSize", 1, "gauge", model_dims()), "do not match its dimensions"),
        (Record("InferenceRequestCount", -1), "not a valid counter value"),
        (Record("RequestBatchSize", float("nan"), "gauge", {"ModelName": "m"}), "not a valid"),
        (Record("RequestBatchSize", "3", "gauge", {"ModelName": "m"}), "not a valid"),
        (Record("RequestBatchSize", True, "gauge", {"ModelName": "m"}), "not a valid"),
        (Record("Requests2XX", 1, dimensions={"Level": "Host"}), "built-in family"),
        (Record("HandlerTime", 1, "gauge", {"ModelName": "m"}), "do not match"),
        (Record("PredictionTime", 1, "histogram", model_dims()), "built-in family"),
        (Record("Bad-Name", 1), "not a valid Prometheus name"),
        (Record("Odd", 1, dimensions={"Hostname": "x"}), "repeat a name"),
        (Record("Odd2", 1, "summary"), "cannot be registered"),
    ],
)
def test_bad_records_are_logged_and_dropped(
    redis_client: fakeredis.FakeRedis,
    caplog: pytest.LogCaptureFixture,
    record: Record,
    reason: str,
) -> None:
    exporter = worker(auto_detect=True)
    with caplog.at_level(logging.WARNING, "control.metrics.recorder"):
        assert exporter.record(record) is False
    assert reason in caplog.text
    flush(exporter, client=redis_client)
    page = render(redis_client)
    assert f"{record.name}{{" not in page and f"{record.name}_bucket{{" not in page


def test_a_broken_record_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    exporter = worker()
    broken = Record("InferenceRequestCount", 1, dimensions=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, "control.metrics.recorder"):
        assert exporter.record(broken) is False
    assert "handler metric 'InferenceRequestCount' dropped" in caplog.text


# -- the page and Redis -------------------------------------------------------------------


def test_name_filter_covers_model_families(redis_client: fakeredis.FakeRedis) -> None:
    exporter = worker()
    exporter.record(Record("InferenceRequestCount", 1))
    flush(exporter, client=redis_client)
    assert render(redis_client, {"InferenceRequestCount"}) == (
        "# HELP InferenceRequestCount Torchserve prometheus counter metric with unit: count\n"
        "# TYPE InferenceRequestCount counter\n"
        'InferenceRequestCount{Hostname="myhost",} 1.0\n'
    )
    assert render(redis_client, {"Nope"}) == ""


def test_catalogue_entries_that_are_not_families_are_skipped(
    redis_client: fakeredis.FakeRedis,
) -> None:
    redis_client.hset(keys.METRIC_FAMILIES, "Garbage", "{not json")
    redis_client.hset(keys.METRIC_FAMILIES, "Wrong", json.dumps({"kind": "summary"}))
    redis_client.hset(
        keys.METRIC_FAMILIES,
        "Requests2XX",
        json.dumps({"kind": "gauge", "help": "fake", "labels": ["x"]}),
    )
    page = render(redis_client)
    assert "Garbage" not in page and "Wrong" not in page
    assert page.count("# TYPE Requests2XX") == 1 and "# TYPE Requests2XX counter" in page


def test_a_failed_flush_keeps_families_and_series() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    exporter = worker()
    exporter.record(Record("InferenceRequestCount", 2))
    server.connected = False
    assert exporter._recorder.flush(client) is False
    assert exporter._recorder.pending()
    server.connected = True
    flush(exporter, client=client)
    assert 'InferenceRequestCount{Hostname="myhost",} 2.0' in render(client)
    assert client.hexists(keys.METRIC_FAMILIES, "TopProbability")


# -- settings -----------------------------------------------------------------------------


def test_properties_set_the_metrics_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "metrics.yaml").write_text(
        "model_metrics:\n  gauge:\n    - {name: G, unit: ms, dimensions: []}\n"
    )
    monkeypatch.chdir(tmp_path)
    settings = apply_properties(
        Settings(),
        {"metrics_config": "conf/metrics.yaml", "model_metrics_auto_detect": "true"},
    )
    assert settings.metrics_config == tmp_path / "conf" / "metrics.yaml"
    assert settings.model_metrics_auto_detect is True
    assert Settings.from_json(settings.to_json()) == settings
    defaults = Settings()
    assert (defaults.metrics_config, defaults.model_metrics_auto_detect) == (None, False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read metrics config"),
        ("model_metrics: [", "is not valid YAML"),
        ("ts_metrics: {}\n", "'model_metrics' key not found"),
    ],
)
def test_an_unusable_metrics_config_stops_startup(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "metrics.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError, match=f"metrics_config: .*{message}"):
        apply_properties(Settings(), {"metrics_config": os.fspath(path)})
