"""TorchServe's parameter quirks, in one place.

TorchServe never answers 400 for a malformed number or boolean: integers that Java's
``Integer.parseInt`` rejects fall back to the default, and booleans are true only for
``true`` in any case (``Boolean.parseBoolean``). The first value of a repeated query
parameter wins. JSON bodies (``Content-Type: application/json`` on register) accept
numbers, numeric strings and booleans, as Gson's lenient reader does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_JAVA_INT = re.compile(r"[+-]?[0-9]+")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class Params:
    """Read-only view over request parameters with TorchServe's parsing rules.

    ``values`` maps names to a list of raw values (query string) or to a JSON value
    (request body). Absent and unparsable values both yield the caller's default.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    @classmethod
    def from_query(cls, query: Mapping[str, list[str]]) -> Params:
        """Wrap a parsed query string (``urllib.parse.parse_qs(keep_blank_values=True)``)."""
        return cls({k: v[0] for k, v in query.items() if v})

    def has(self, name: str) -> bool:
        """True when ``name`` was sent at all (even empty)."""
        return name in self._values and self._values[name] is not None

    def text(self, name: str, default: str | None = None) -> str | None:
        """The raw value as text, or ``default`` when absent."""
        value = self._values.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        if isinstance(value, (dict, list)):
            return default
        return str(value)

    def integer(self, name: str, default: int) -> int:
        """``Integer.parseInt`` semantics: a 32-bit decimal integer, else ``default``."""
        value = self._values.get(name)
        if isinstance(value, bool) or value is None:
            return default
        if isinstance(value, int):
            return value if _INT_MIN <= value <= _INT_MAX else default
        if isinstance(value, float):
            return int(value) if value.is_integer() else default
        text = str(value)
        if not _JAVA_INT.fullmatch(text):
            return default
        number = int(text)
        return number if _INT_MIN <= number <= _INT_MAX else default

    def boolean(self, name: str, default: bool) -> bool:
        """``Boolean.parseBoolean`` semantics when present: only ``true`` is true."""
        value = self._values.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        return str(value).lower() == "true"
