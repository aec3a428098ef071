"""TorchServe's parameter quirks, in one place.

TorchServe never answers 400 for a malformed number or boolean: integers that Java's
``Integer.parseInt`` rejects fall back to the default, and booleans are true only for
``true`` in any case (``Boolean.parseBoolean``). The first value of a repeated query
parameter wins. JSON bodies (``Content-Type: application/json`` on register) accept
numbers, numeric strings and booleans, as Gson's lenient reader does.

Beyond TorchServe, :meth:`Params.count` bounds worker counts: a count that is a whole
number but above the server's maximum is a 400 instead of the default, since a client
asking for three billion workers made a mistake that must not pass silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from control.core.errors import BadRequestException

_JAVA_INT = re.compile(r"[+-]?[0-9]+")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
#: Digit strings longer than this are not converted (see :meth:`Params.whole`).
_LONGEST = 64
_HUGE = 10**64


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
        """``Integer.parseInt`` semantics: a 32-bit decimal integer, else ``default``.

        A JSON number counts when it is integral (``3`` or ``3.0``) and in range, so
        ``3e9`` falls back to ``default`` as ``"3000000000"`` does.
        """
        number = self.whole(name)
        return number if number is not None and _INT_MIN <= number <= _INT_MAX else default

    def whole(self, name: str) -> int | None:
        """The value as a whole number of any size, or ``None`` when absent or not one.

        Accepts what :meth:`integer` accepts, without its 32-bit range: a decimal string
        (optional sign) or an integral JSON number. Booleans, fractions, ``NaN`` and
        infinities are not whole numbers.
        """
        value = self._values.get(name)
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return int(value) if value.is_integer() else None
        text = str(value)
        if not _JAVA_INT.fullmatch(text):
            return None
        digits = text.lstrip("+-").lstrip("0") or "0"
        sign = -1 if text.startswith("-") else 1
        if len(digits) > _LONGEST:
            # Python refuses to convert very long digit strings (CVE-2020-10735); any
            # value this long is far out of every range, so a stand-in of its sign will do.
            return sign * _HUGE
        return sign * int(digits)

    def count(self, name: str, default: int, maximum: int) -> int:
        """A worker count: :meth:`integer` semantics, but a whole number above ``maximum``
        (however large) raises a 400 ``<name> cannot be more than <maximum>.``.

        Negative and other small values are returned as they are, for the caller's rules.
        """
        number = self.whole(name)
        if number is not None and number > maximum:
            raise BadRequestException(f"{name} cannot be more than {maximum}.")
        return self.integer(name, default)

    def boolean(self, name: str, default: bool) -> bool:
        """``Boolean.parseBoolean`` semantics when present: only ``true`` is true."""
        value = self._values.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        return str(value).lower() == "true"
