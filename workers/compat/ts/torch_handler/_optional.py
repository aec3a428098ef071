"""Import the optional packages a built-in handler needs, or say which one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, distribution: str, handler: str) -> ModuleType:
    """Import ``module``; if its package is absent, raise a ModuleNotFoundError naming it.

    The error's ``name`` is the missing top-level module, so the loader reports it as a
    missing dependency of the built-in ``handler``, not as a missing handler.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module + ".").startswith(exc.name + "."):
            raise
        raise ModuleNotFoundError(
            f"The built-in handler '{handler}' needs the '{distribution}' package, "
            "which is not installed",
            name=exc.name,
        ) from None
