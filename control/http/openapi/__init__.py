"""OpenAPI 3 descriptions of mqserve's ports, kept in the repository as JSON.

They are the compatibility contract: tests check that every documented path and
method is answered as described and that nothing undocumented is.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def _load(port: str) -> str:
    return resources.files(__name__).joinpath(f"{port}.json").read_text(encoding="utf-8")


def load_description(port: str) -> dict[str, Any]:
    """A fresh copy of the description of ``port`` (``management``, ``inference``...)."""
    data: dict[str, Any] = json.loads(_load(port))
    return data
