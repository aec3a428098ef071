"""A BaseHandler that records custom metrics, on the pattern of TorchServe's
``examples/custom_metrics/mnist_handler.py``; it runs unchanged on TorchServe 0.12.

Each request's body is a point ``[x, y]`` (a JSON list, or that JSON as text or bytes);
the answer is ``{"label": "above" | "below", "probability": p}``: on which side of the
diagonal ``y = x`` the point lies, with the model's probability. A body that is not two
finite numbers fails the batch with status 400 (``PredictionException``).

The metrics it records, and how (``metrics.yaml`` beside this file declares all but
``ModelSize``, which needs ``model_metrics_auto_detect=true`` to reach the page):

======================  =========  ============================  =======================
metric                  type       dimensions (then Hostname)    recorded with
======================  =========  ============================  =======================
InitializeCallCount     counter    ModelName, Level              add_metric (initialize)
ModelSize (kB)          gauge      ModelName, Level              add_size (initialize)
InferenceRequestCount   counter    (none)                        add_metric_to_cache
PreprocessCallCount     counter    ModelName                     get_metric
RequestBatchSize        gauge      ModelName                     get_metric (yaml only)
HandlerMethodTime (ms)  gauge      MethodName, ModelName, Level  add_time
PostprocessCallCount    counter    ModelName, Level              add_counter
PredictedLabelCount     counter    Label, ModelName, Level       add_counter, per request
TopProbability          histogram  ModelName, Level              add_metric, per request
======================  =========  ============================  =======================
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException


def parse_point(value: Any) -> list[float]:
    """``[x, y]`` as two finite floats; ValueError with a message for the client."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the body is not JSON: {exc}") from exc
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("expected a point [x, y]: a JSON list of two numbers")
    point = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise ValueError(f"{item!r} is not a finite number")
        point.append(float(item))
    return point


class DiagonalClassifier(BaseHandler):
    """Above or below ``y = x``; BaseHandler loads the TorchScript model and the labels."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        metrics = context.metrics
        # Declared here (and in metrics.yaml): updated through the returned object.
        self.inference_request_count = metrics.add_metric_to_cache(
            metric_name="InferenceRequestCount",
            unit="count",
            dimension_names=[],
            metric_type=MetricTypes.COUNTER,
        )
        metrics.add_metric_to_cache(
            metric_name="PreprocessCallCount",
            unit="count",
            dimension_names=["ModelName"],
            metric_type=MetricTypes.COUNTER,
        )
        # Recorded at load: one per worker, so the page's sum counts the workers.
        metrics.add_metric(
            name="InitializeCallCount",
            value=1,
            unit="count",
            dimensions=[
                Dimension(name="ModelName", value=context.model_name),
                Dimension(name="Level", value="Model"),
            ],
            metric_type=MetricTypes.COUNTER,
        )
        # Not in metrics.yaml: shown only with model_metrics_auto_detect=true.
        metrics.add_size("ModelSize", os.path.getsize(self.model_pt_path) / 1024, None, "kB")

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        """One row per request: a float32 tensor of shape ``(len(data), 2)``."""
        start = time.time()
        metrics = self.context.metrics
        self.inference_request_count.add_or_update(value=len(data), dimension_values=[])
        metrics.get_metric(
            metric_name="PreprocessCallCount", metric_type=MetricTypes.COUNTER
        ).add_or_update(value=1, dimension_values=[self.context.model_name])
        # RequestBatchSize is declared only in metrics.yaml: get_metric finds it there.
        metrics.get_metric(
            metric_name="RequestBatchSize", metric_type=MetricTypes.GAUGE
        ).add_or_update(value=len(data), dimension_values=[self.context.model_name])
        rows = []
        for index, request in enumerate(data):
            body = request.get("data")
            if body is None:
                body = request.get("body")
            try:
                rows.append(parse_point(body))
            except ValueError as exc:
                raise PredictionException(f"request {index}: {exc}", 400) from exc
        metrics.add_time(
            name="HandlerMethodTime",
            value=(time.time() - start) * 1000,
            idx=None,
            unit="ms",
            dimensions=[Dimension(name="MethodName", value="preprocess")],
            metric_type=MetricTypes.GAUGE,
        )
        return torch.tensor(rows, dtype=torch.float32)

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        """Logits ``(n, 2)`` to one ``{"label", "probability"}`` per request."""
        metrics = self.context.metrics
        metrics.add_counter(name="PostprocessCallCount", value=1, idx=None, dimensions=[])
        probabilities = torch.softmax(data.float(), dim=1)
        top = probabilities.max(dim=1)
        mapping = self.mapping or {}
        answers = []
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        for idx, (p, index) in enumerate(pairs):
            label = mapping.get(str(index), str(index))
            metrics.add_counter(
                name="PredictedLabelCount",
                value=1,
                idx=idx,
                dimensions=[Dimension(name="Label", value=label)],
            )
            metrics.add_metric(
                name="TopProbability",
                value=p,
                unit="ratio",
                idx=idx,
                metric_type=MetricTypes.HISTOGRAM,
            )
            answers.append({"label": label, "probability": p})
        return answers
