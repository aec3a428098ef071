"""Helpers for tests that read the OpenAPI descriptions in ``control/openapi``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every ``(path, method, operation)`` of a description."""
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` (JSON pointer into ``doc``) until a plain node."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"non-local $ref {ref}"
        node = doc
        for token in ref[2:].split("/"):
            token = token.replace("~1", "/").replace("~0", "~")
            assert isinstance(node, dict) and token in node, f"unresolved $ref {ref}"
            node = node[token]
    return node


def all_refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` value anywhere below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from all_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_refs(value)


def error_types(doc: dict[str, Any], response: dict[str, Any]) -> set[str]:
    """The ``type`` values of a documented error response's examples."""
    media = resolve(doc, response).get("content", {}).get("application/json", {})
    return {
        resolve(doc, example)["value"].get("type") for example in media.get("examples", {}).values()
    } - {None}


ERROR_REF = "#/components/schemas/ErrorResponse"


def without_error_response(doc: dict[str, Any]) -> list[str]:
    """Token-checked operations that document no 4xx ``ErrorResponse`` (should be none)."""
    missing = []
    for path, method, op in operations(doc):
        if op.get("security") == []:
            continue  # open routes (OPTIONS /, /api-description, /ping) refuse nothing
        refs = [
            resolve(doc, response)
            .get("content", {})
            .get("application/json", {})
            .get("schema", {})
            .get("$ref")
            for code, response in op["responses"].items()
            if code.startswith("4")
        ]
        if ERROR_REF not in refs:
            missing.append(f"{method.upper()} {path}")
    return missing
