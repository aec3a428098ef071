"""TorchServe handler for the Iris classifier: four measurements in, the top 3 species out.

Works unchanged on TorchServe 0.12 and on mqserve. ``BaseHandler.initialize`` loads the
TorchScript ``iris.pt`` (the archive's ``serializedFile``) and ``index_to_name.json`` into
``self.mapping``; ``BaseHandler.inference`` runs the model; this class only converts
requests to a tensor and logits to labels.

Each request's ``body`` (or ``data``) may be, in centimetres, sepal length, sepal width,
petal length and petal width as

* a JSON list: ``[5.1, 3.5, 1.4, 0.2]``
* a JSON object: ``{"features": [5.1, 3.5, 1.4, 0.2]}``
* text: ``5.1,3.5,1.4,0.2`` (bytes are decoded as UTF-8; a JSON text is accepted too)

The answer for each request is ``{label: probability}`` for the three most likely
species, most likely first. Input that is none of the above is answered with status 400
(``PredictionException``) for the whole batch, as TorchServe does for handler errors.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

N_FEATURES = 4
TOP_K = 3


def parse_features(value: Any) -> list[float]:
    """The four measurements of one request, as finite floats.

    ``value`` is what the server decoded from the request body: a list, a dict with
    ``features``, a ``str``, or ``bytes``/``bytearray`` (decoded as UTF-8). Raises
    ``ValueError`` with a message for the client when the value is not one of those.
    """
    value = _decode_text(value)
    if isinstance(value, dict):
        if "features" not in value:
            raise ValueError('a JSON object needs a "features" list')
        value = value["features"]
    if not isinstance(value, list | tuple) or len(value) != N_FEATURES:
        raise ValueError(
            f"expected {N_FEATURES} numbers (sepal length, sepal width, petal length, "
            'petal width), as a JSON list, {"features": [...]} or text like 5.1,3.5,1.4,0.2'
        )
    return [_finite_float(item) for item in value]


def _decode_text(value: Any) -> Any:
    """Bytes and text as the JSON value or comma-separated items they hold; else ``value``."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("the request body is not UTF-8 text") from exc
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the request body is not valid JSON: {exc}") from exc
    return text.replace(",", " ").split()


def _finite_float(item: Any) -> float:
    if isinstance(item, bool):  # JSON true/false are not measurements
        raise ValueError(f"{item!r} is not a number")
    try:
        number = float(item)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{item!r} is not a number") from exc
    if not math.isfinite(number):
        raise ValueError(f"{item!r} is not a finite number")
    return number


class IrisHandler(BaseHandler):
    """Iris species classifier; the model and label mapping are loaded by BaseHandler."""

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        """One row per request: a float32 tensor of shape ``(len(data), 4)``.

        Raises ``PredictionException`` (HTTP 400) naming the request that is malformed.
        """
        rows = []
        for index, request in enumerate(data):
            value = request.get("data")
            if value is None:
                value = request.get("body")
            try:
                rows.append(parse_features(value))
            except ValueError as exc:
                raise PredictionException(f"request {index}: {exc}", 400) from exc
        return torch.tensor(rows, dtype=torch.float32)

    def postprocess(self, data: torch.Tensor) -> list[dict[str, float]]:
        """Logits ``(n, 3)`` to one ``{label: probability}`` per request, most likely first.

        Labels come from ``self.mapping`` (``index_to_name.json``), else the class index.
        """
        probabilities = torch.softmax(data.float(), dim=1)
        top = torch.topk(probabilities, k=min(TOP_K, probabilities.shape[1]), dim=1)
        mapping = self.mapping or {}
        rows = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        return [
            {mapping.get(str(i), str(i)): p for p, i in zip(probs, indices, strict=True)}
            for probs, indices in rows
        ]
