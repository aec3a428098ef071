"""The handler's metrics cache (``context.metrics``) and the metrics.yaml it is built from.

TorchServe 0.12's ``MetricsCacheYamlImpl``: declared metrics, undeclared ones, the
``add_*`` APIs, dimensions, types, and bad input that is logged and dropped.
"""

from __future__ import annotations

import enum
import importlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from control.core.metrics_schema import (
    BY_NAME,
    DEFAULT_METRICS_CONFIG,
    Kind,
    MetricsConfig,
    MetricsConfigError,
    MetricSpec,
    load_metrics_config,
    parse_metrics_config,
)
from tests.support.handlers import isolated_imports
from workers.handling import install_compat_path
from workers.handling.metrics import (
    Dimension,
    HandlerMetrics,
    MetricRecord,
    MetricsCacheKeyError,
    MetricsCacheTypeError,
    MetricTypes,
)

CONFIG = MetricsConfig(
    (
        MetricSpec("RequestBatchSize", Kind.GAUGE, "count", ("ModelName",)),
        MetricSpec("CallCount", Kind.COUNTER, "count", ("ModelName", "Level")),
        MetricSpec("Latency", Kind.HISTOGRAM, "ms", ("Stage", "ModelName", "Level")),
    )
)


@pytest.fixture
def metrics() -> HandlerMetrics:
    cache = HandlerMetrics("m", CONFIG)
    cache.set_request_ids({0: "r0", 1: "r1"})
    return cache


def only(records: list[MetricRecord]) -> tuple[str, float, dict[str, str], MetricTypes]:
    (record,) = records
    return record.name, record.value, record.dimensions, record.metric_type


# -- declared and undeclared metrics ---------------------------------------------------


def test_yaml_metrics_are_declared_at_creation(metrics: HandlerMetrics) -> None:
    assert sorted(metrics.cache_keys()) == [
        "counter:CallCount",
        "gauge:RequestBatchSize",
        "histogram:Latency",
    ]
    gauge = metrics.get_metric("RequestBatchSize", MetricTypes.GAUGE)
    assert (gauge.unit, gauge.dimension_names) == ("count", ["ModelName"])
    gauge.add_or_update(4, ["m"], request_id="r0")
    assert only(metrics.drain()) == ("RequestBatchSize", 4.0, {"ModelName": "m"}, "gauge")


def test_default_cache_declares_torchserves_model_metrics() -> None:
    cache = HandlerMetrics("m")
    assert sorted(cache.cache_keys()) == ["gauge:HandlerTime", "gauge:PredictionTime"]
    assert cache.get_metric("HandlerTime", MetricTypes.GAUGE).dimension_names == [
        "ModelName",
        "Level",
    ]


def test_get_metric_of_an_undeclared_metric_raises(metrics: HandlerMetrics) -> None:
    with pytest.raises(MetricsCacheKeyError, match="name 'Nope' doesn't exist"):
        metrics.get_metric("Nope", MetricTypes.COUNTER)
    # Declared as a gauge: a counter of that name is another metric.
    with pytest.raises(MetricsCacheKeyError):
        metrics.get_metric("RequestBatchSize")
    with pytest.raises(MetricsCacheKeyError):
        metrics.get_metric("RequestBatchSize", "summary")  # type: ignore[arg-type]


def test_add_metric_to_cache_declares_and_redeclares(metrics: HandlerMetrics) -> None:
    first = metrics.add_metric_to_cache("Distance", "km", ["Route"], MetricTypes.GAUGE)
    assert metrics.get_metric("Distance", MetricTypes.GAUGE) is first
    second = metrics.add_metric_to_cache("Distance", "m", ["Route", "Leg"], MetricTypes.GAUGE)
    assert metrics.get_metric("Distance", MetricTypes.GAUGE) is second
    second.add_or_update(3.5, ["a", "b"])
    assert only(metrics.drain()) == ("Distance", 3.5, {"Route": "a", "Leg": "b"}, "gauge")


def test_add_apis_create_undeclared_metrics_with_default_dimensions(
    metrics: HandlerMetrics,
) -> None:
    metrics.add_counter("Hits", 2, idx=1, dimensions=[Dimension("Route", "a")])
    hits = metrics.get_metric("Hits", MetricTypes.COUNTER)
    assert (hits.unit, hits.dimension_names) == ("count", ["Route", "ModelName", "Level"])
    metrics.add_counter("Hits", 1, idx=0, dimensions=[Dimension("Route", "b")])
    records = metrics.drain()
    assert [(r.value, r.dimensions["Route"], r.request_id) for r in records] == [
        (2.0, "a", "r1"),
        (1.0, "b", "r0"),
    ]
    assert records[0].dimensions == {"Route": "a", "ModelName": "m", "Level": "Model"}


def test_add_apis_update_declared_metrics(metrics: HandlerMetrics) -> None:
    metrics.add_counter("CallCount", 1)  # declared [ModelName, Level]: the defaults fit
    metrics.add_time("Latency", 12.5, dimensions=[Dimension("Stage", "pre")],
                     metric_type=MetricTypes.HISTOGRAM)  # fmt: skip
    records = metrics.drain()
    assert [(r.name, r.metric_type, r.request_id) for r in records] == [
        ("CallCount", "counter", "r0,r1"),
        ("Latency", "histogram", "r0,r1"),
    ]
    assert records[1].dimensions == {"Stage": "pre", "ModelName": "m", "Level": "Model"}


def test_given_model_name_and_level_are_kept(metrics: HandlerMetrics) -> None:
    dims = [Dimension("ModelName", "other"), Dimension("Level", "Host")]
    metrics.add_metric("CallCount", 1, "count", dimensions=dims)
    metrics.add_error("Failures", 1)
    records = metrics.drain()
    assert records[0].dimensions == {"ModelName": "other", "Level": "Host"}
    assert (records[1].dimensions, records[1].metric_type) == ({"Level": "Error"}, "counter")


def test_types_and_units_of_the_add_apis(metrics: HandlerMetrics) -> None:
    metrics.add_time("T", 1, unit="s")
    metrics.add_size("S", 2, unit="GB", metric_type=MetricTypes.COUNTER)
    metrics.add_percent("P", 50, metric_type=MetricTypes.HISTOGRAM)
    metrics.add_metric("G", 3, "things")
    assert [(r.name, r.unit, r.metric_type) for r in metrics.drain()] == [
        ("T", "s", "gauge"),
        ("S", "GB", "counter"),
        ("P", "percent", "histogram"),
        ("G", "things", "counter"),
    ]


def test_metric_types_given_as_strings_or_foreign_enums(metrics: HandlerMetrics) -> None:
    class OtherTypes(enum.Enum):  # a real TorchServe's MetricTypes is a plain Enum
        GAUGE = "gauge"

    metrics.add_metric("A", 1, "u", metric_type="GAUGE")  # type: ignore[arg-type]
    metrics.add_metric("B", 1, "u", metric_type=OtherTypes.GAUGE)  # type: ignore[arg-type]
    assert [r.metric_type for r in metrics.drain()] == ["gauge", "gauge"]
    assert metrics.get_metric("B", OtherTypes.GAUGE) is metrics.get_metric("B", MetricTypes.GAUGE)  # type: ignore[arg-type]


def test_update_replaces_the_dimension_names(metrics: HandlerMetrics) -> None:
    metric = metrics.add_metric_to_cache("Loads", "count", ["Stage"])
    metric.update(3, request_id="r9", dimensions=[Dimension("Phase", "cold")])
    assert metric.dimension_names == ["Phase"]
    (record,) = metrics.drain()
    assert (record.dimensions, record.request_id) == ({"Phase": "cold"}, "r9")


# -- bad input is logged and dropped ----------------------------------------------------


@pytest.mark.parametrize(
    ("metric_name", "kind", "value", "dims", "reason"),
    [
        ("CallCount", MetricTypes.COUNTER, 1, ["m"], "should correspond to Dimension names"),
        ("CallCount", MetricTypes.COUNTER, -1, ["m", "Model"], "cannot be negative"),
        ("CallCount", MetricTypes.COUNTER, float("nan"), ["m", "Model"], "not a finite"),
        ("RequestBatchSize", MetricTypes.GAUGE, float("inf"), ["m"], "not a finite"),
        ("RequestBatchSize", MetricTypes.GAUGE, "7", ["m"], "not a finite"),
        ("RequestBatchSize", MetricTypes.GAUGE, True, ["m"], "not a finite"),
        ("RequestBatchSize", MetricTypes.GAUGE, None, ["m"], "not a finite"),
    ],
)
def test_bad_updates_are_logged_and_dropped(
    metrics: HandlerMetrics,
    caplog: pytest.LogCaptureFixture,
    metric_name: str,
    kind: MetricTypes,
    value: object,
    dims: list[str],
    reason: str,
) -> None:
    with caplog.at_level(logging.ERROR, "workers.handling.metrics"):
        metrics.get_metric(metric_name, kind).add_or_update(value, dims)  # type: ignore[arg-type]
    assert metrics.drain() == []
    assert reason in caplog.text and metric_name in caplog.text


def test_negative_gauges_and_histograms_are_fine(metrics: HandlerMetrics) -> None:
    metrics.get_metric("RequestBatchSize", MetricTypes.GAUGE).add_or_update(-2, ["m"])
    metrics.add_metric("Delta", -1.5, "u", metric_type=MetricTypes.HISTOGRAM)
    assert [r.value for r in metrics.drain()] == [-2.0, -1.5]


def test_unknown_metric_types_never_raise(
    metrics: HandlerMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "workers.handling.metrics"):
        metrics.add_metric("X", 1, "u", metric_type="summary")  # type: ignore[arg-type]
        metric = metrics.add_metric_to_cache("Y", "u", [], "summary")  # type: ignore[arg-type]
        metric.add_or_update(1, [])
    assert metrics.drain() == []
    assert "unknown type 'summary'" in caplog.text
    assert "its metric type is not counter, gauge or histogram" in caplog.text
    with pytest.raises(MetricsCacheKeyError):
        metrics.get_metric("Y", "summary")  # type: ignore[arg-type]


def test_declaring_with_wrong_argument_types_raises_as_torchserve(
    metrics: HandlerMetrics,
) -> None:
    with pytest.raises(MetricsCacheTypeError, match="metric_name"):
        metrics.add_metric_to_cache(1, "u")  # type: ignore[arg-type]
    with pytest.raises(MetricsCacheTypeError, match="unit"):
        metrics.add_metric_to_cache("A", None)  # type: ignore[arg-type]
    with pytest.raises(MetricsCacheTypeError, match="dimension_names"):
        metrics.add_metric_to_cache("A", "u", "ModelName")


# -- metrics.yaml -------------------------------------------------------------------------


def test_default_config_is_torchserves() -> None:
    data = yaml.safe_load(DEFAULT_METRICS_CONFIG.read_text())
    assert load_metrics_config() == MetricsConfig(
        (
            MetricSpec("HandlerTime", Kind.GAUGE, "ms", ("ModelName", "Level")),
            MetricSpec("PredictionTime", Kind.GAUGE, "ms", ("ModelName", "Level")),
        )
    )
    # The frontend section describes the built-in families the page has.
    for kind, entries in data["ts_metrics"].items():
        for entry in entries:
            family = BY_NAME.get(entry["name"])
            if family is None:  # system and GPU metrics mqserve does not collect
                continue
            assert (family.kind, family.labels) == (kind, tuple(entry["dimensions"]))
            assert family.help.endswith(f"with unit: {entry['unit']}")
    assert set(data["dimensions"]) == {"ModelName", "WorkerName", "Level", "DeviceId", "Hostname"}


def test_example_config_parses() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "custom_metrics" / "metrics.yaml"
    config = load_metrics_config(example)
    assert {s.name: s.kind for s in config.model_metrics}["TopProbability"] is Kind.HISTOGRAM
    assert "ModelSize" not in {s.name for s in config.model_metrics}  # left to auto-detect


def test_last_declaration_wins() -> None:
    config = parse_metrics_config(
        {
            "model_metrics": {
                "counter": [{"name": "A", "unit": "count", "dimensions": None}],
                "gauge": [{"name": "A", "unit": "ms", "dimensions": ["ModelName"]}],
            }
        }
    )
    assert config == MetricsConfig((MetricSpec("A", Kind.GAUGE, "ms", ("ModelName",)),))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a YAML mapping"),
        ({"ts_metrics": {}}, "'model_metrics' key not found"),
        ({"model_metrics": {}}, "Missing `model_metrics` specification"),
        ({"model_metrics": {"summary": []}}, "Invalid metric type 'summary'"),
        ({"model_metrics": {"counter": {"name": "A"}}}, "must be a list"),
        ({"model_metrics": {"counter": [{"name": "A", "unit": "u"}]}}, "'dimensions'"),
        ({"model_metrics": {"counter": [{"name": "", "unit": "u", "dimensions": []}]}}, "name"),
        ({"model_metrics": {"gauge": [{"name": "A", "unit": "", "dimensions": []}]}}, "unit"),
        ({"model_metrics": {"gauge": [{"name": "a-b", "unit": "u", "dimensions": []}]}}, "'a-b'"),
        ({"model_metrics": {"gauge": [{"name": "A", "unit": "u", "dimensions": [1]}]}}, "list"),
        ({"model_metrics": {"gauge": [{"name": "A", "unit": "u", "dimensions": ["x y"]}]}},
         "'x y' is not a valid label"),
        ({"model_metrics": {"gauge": [{"name": "A", "unit": "u", "dimensions": ["Hostname"]}]}},
         "Hostname is added"),
        ({"model_metrics": {"histogram": [{"name": "A", "unit": "u", "dimensions": ["le"]}]}},
         "label 'le'"),
        ({"ts_metrics": [], "model_metrics": {"gauge": []}}, "ts_metrics must be a mapping"),
    ],
)  # fmt: skip
def test_invalid_configs_are_refused(data: object, message: str) -> None:
    with pytest.raises(MetricsConfigError, match=re.escape(message)):
        parse_metrics_config(data)


def test_unreadable_or_unparsable_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(MetricsConfigError, match=r"cannot read metrics config .*missing\.yaml"):
        load_metrics_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_metrics: [unclosed\n")
    with pytest.raises(MetricsConfigError, match=re.escape("broken.yaml is not valid YAML")):
        load_metrics_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("model_metrics:\n")
    with pytest.raises(MetricsConfigError, match=re.escape("empty.yaml: Missing `model_metrics`")):
        load_metrics_config(empty)


# -- the ts compatibility modules ---------------------------------------------------------


@pytest.fixture
def compat(tmp_path: Path) -> Iterator[None]:
    with isolated_imports(tmp_path):
        install_compat_path()
        yield


@pytest.mark.usefixtures("compat")
def test_ts_metrics_modules_as_handlers_and_their_tests_import_them(tmp_path: Path) -> None:
    errors = importlib.import_module("ts.metrics.metric_cache_errors")
    assert errors.MetricsCacheKeyError is MetricsCacheKeyError
    caching = importlib.import_module("ts.metrics.caching_metric")
    impl = importlib.import_module("ts.metrics.metric_cache_yaml_impl")
    path = tmp_path / "metrics.yaml"
    path.write_text(
        "model_metrics:\n  counter:\n    - name: Calls\n      unit: count\n"
        "      dimensions: [ModelName, Level]\n"
    )
    cache = impl.MetricsCacheYamlImpl(config_file_path=str(path))
    assert cache.cache_keys() == []
    cache.initialize_cache()
    cache.model_name = "mnist"
    assert cache.cache_keys() == ["counter:Calls"]
    assert isinstance(cache.get_metric("Calls"), caching.CachingMetric)
    cache.add_counter("Calls", 2)
    assert only(cache.drain()) == (
        "Calls",
        2.0,
        {"ModelName": "mnist", "Level": "Model"},
        "counter",
    )
    with pytest.raises(MetricsConfigError):
        impl.MetricsCacheYamlImpl(config_file_path=str(tmp_path / "absent.yaml"))
