"""TorchServe's ``ts.utils.util``: helpers handler code imports.

``get_yaml_config`` parses with ``yaml.safe_load`` only: a model-config.yaml can never
construct Python objects.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from workers.handling.loader import list_classes_from_module

__all__ = [
    "PredictionException",
    "get_yaml_config",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
]

logger = logging.getLogger(__name__)


class PredictionException(Exception):
    """Raised by a handler to answer the whole batch with ``error_code`` and ``message``."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"


def load_label_mapping(mapping_file_path: str) -> dict[str, str] | None:
    """Read an ``index_to_name.json`` ``{class index: label}``; None if the file is absent.

    A label may be a list (its last element is used); the older
    ``{"object_type_names": [...]}`` form is accepted. Raises ValueError otherwise.
    """
    if not os.path.isfile(mapping_file_path):
        logger.warning(
            "%s is missing. Inference output will not include class name.",
            os.path.basename(mapping_file_path),
        )
        return None
    with open(mapping_file_path, encoding="utf-8") as file:
        mapping = json.load(file)
    if not isinstance(mapping, dict):
        raise ValueError('index->name JSON mapping should be in "class": "label" format.')
    names = mapping.get("object_type_names")
    if isinstance(names, list):
        return {str(index): str(name) for index, name in enumerate(names)}
    labels: dict[str, str] = {}
    for key, value in mapping.items():
        label = value[-1] if isinstance(value, list) and value else value
        if not isinstance(label, str):
            raise ValueError("labels in index->name mapping must be either str or List[str]")
        labels[str(key)] = label
    return labels


def map_class_to_label(
    probs: list[list[Any]],
    mapping: dict[str, str] | None = None,
    lbl_classes: Iterable[Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """``[{label: probability}]`` per row of ``probs``.

    ``lbl_classes`` gives each row's class indices (default ``0..n-1``); labels come
    from ``mapping`` when given, else the index as a string.
    """
    if not isinstance(probs, list):
        raise TypeError("Convert classes to list before doing mapping")
    if mapping is not None and not isinstance(mapping, dict):
        raise TypeError("Mapping must be a dict")
    if lbl_classes is None:
        lbl_classes = itertools.repeat(range(len(probs[0])), len(probs)) if probs else []
    return [
        {
            (mapping[str(cls)] if mapping is not None else str(cls)): prob
            for cls, prob in zip(classes, row, strict=False)
        }
        for classes, row in zip(lbl_classes, probs, strict=False)
    ]


def get_yaml_config(yaml_file_path: str) -> Any:
    """Parse a YAML file with ``yaml.safe_load`` (``None`` for an empty file)."""
    with open(yaml_file_path, encoding="utf-8") as file:
        return yaml.safe_load(file)
