"""``examples/custom_metrics`` end to end: an archive built by the real torch-model-archiver,
registered through a real API process, served by two real workers, and its handler's
metrics (load time and per request) on the metrics app's ``/metrics``, summed over both.

The supervisor gets the example's settings the way a user's would: from a
``config.properties`` (``--ts-config`` through ``TS_CONFIG_FILE``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.core.settings import Settings, apply_properties, read_properties
from control.management.client import ManagementClient
from tests.support.processes import api_process, supervisor_process, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_metrics"
ABOVE, BELOW = [-1.5, 1.0], [2.0, -0.5]  # far from the diagonal: no doubt about the label
POINTS = [ABOVE, BELOW, ABOVE, BELOW, ABOVE, BELOW]


def page(metrics: str) -> str:
    with urllib.request.urlopen(f"{metrics}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return str(response.read().decode())


def predict(inference: str, point: list[float], answers: list[dict[str, object]]) -> None:
    request = urllib.request.Request(
        f"{inference}/predictions/diagonal",
        data=json.dumps(point).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        answers.append(json.loads(response.read()))


@pytest.fixture
def archive(store: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "build.py"), "--export-path", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"build.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert "held-out accuracy: " in proc.stdout
    return store / "diagonal.mar"


@pytest.mark.usefixtures("archive")
def test_handler_metrics_reach_the_metrics_page(
    stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts_config = tmp_path / "config.properties"
    ts_config.write_text(
        f"metrics_mode=prometheus\nmetrics_config={EXAMPLE / 'metrics.yaml'}\n"
        "model_metrics_auto_detect=true\n"
    )
    monkeypatch.setenv("TS_CONFIG_FILE", str(ts_config))  # the supervisor's --ts-config
    settings = apply_properties(stack_settings, read_properties(ts_config))
    with (
        api_process(settings, tmp_path / "api") as management,
        api_process(settings, tmp_path / "api", "inference") as inference,
        api_process(settings, tmp_path / "api", "metrics") as metrics,
        supervisor_process(settings, tmp_path / "h1", "h1"),
    ):
        response = ManagementClient(management).register_model_with_params(
            {"url": "diagonal.mar", "initial_workers": 2}
        )
        assert response.status == 200, response.body
        host = f'Hostname="{socket.gethostname()}",'
        # Recorded in initialize by each of the two workers: the page sums them.
        initialized = f'InitializeCallCount{{ModelName="diagonal",Level="Model",{host}}} 2.0'
        wait_for(lambda: initialized in page(metrics), 30, "InitializeCallCount of 2 workers")

        answers: list[dict[str, object]] = []
        threads = [
            threading.Thread(target=predict, args=(inference, point, answers)) for point in POINTS
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert sorted(str(a["label"]) for a in answers) == ["above"] * 3 + ["below"] * 3

        total = f"InferenceRequestCount{{{host}}} 6.0"
        wait_for(lambda: total in page(metrics), 30, "6 requests on the metrics page")
        # The histogram's series are written in the same flush as the counter's, but a
        # worker may flush its last batch a moment after the other: wait for all six.
        count = f'TopProbability_count{{ModelName="diagonal",Level="Model",{host}}} 6.0'
        wait_for(lambda: count in page(metrics), 30, "6 TopProbability observations")
        text = page(metrics)

    lines = text.splitlines()
    model = f'ModelName="diagonal",Level="Model",{host}'
    for expected in [
        "# HELP InferenceRequestCount Torchserve prometheus counter metric with unit: count",
        "# TYPE InferenceRequestCount counter",
        f'PreprocessCallCount{{ModelName="diagonal",{host}}} 6.0',
        f"PostprocessCallCount{{{model}}} 6.0",
        f'PredictedLabelCount{{Label="above",{model}}} 3.0',
        f'PredictedLabelCount{{Label="below",{model}}} 3.0',
        "# TYPE RequestBatchSize gauge",
        f'RequestBatchSize{{ModelName="diagonal",{host}}} 1.0',
        "# HELP TopProbability Torchserve prometheus histogram metric with unit: ratio",
        "# TYPE TopProbability histogram",
        f'TopProbability_bucket{{{model}le="+Inf",}} 6.0',
        f'TopProbability_bucket{{{model}le="0.25",}} 0.0',
        # Not in metrics.yaml: there through model_metrics_auto_detect, with the unit
        # named as TorchServe's backend names kB.
        "# HELP ModelSize Torchserve prometheus gauge metric with unit: Kilobytes",
        "# TYPE ModelSize gauge",
    ]:
        assert expected in lines, expected
    assert any(line.startswith(f"ModelSize{{{model}}} ") for line in lines)
    assert any(
        line.startswith(f'HandlerMethodTime{{MethodName="preprocess",{model}}} ') for line in lines
    )
    for name in ("HandlerTime", "PredictionTime"):
        assert any(line.startswith(f"{name}{{{model}}} ") for line in lines), name

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["PredictedLabelCount"].type == "counter"
    assert families["HandlerMethodTime"].type == "gauge"
    histogram = families["TopProbability"]
    assert histogram.type == "histogram"
    samples = {s.name: s.value for s in histogram.samples if "le" not in s.labels}
    expected_sum = sum(float(str(a["probability"])) for a in answers)
    assert samples["TopProbability_count"] == 6.0
    assert samples["TopProbability_sum"] == pytest.approx(expected_sum)
