"""Make ``import ts`` work for TorchServe handlers without shadowing a real TorchServe.

The compatibility package lives in ``workers/compat/ts``. Its directory is appended to
the **end** of ``sys.path``, and only when no ``ts`` is importable already, so a
TorchServe installation (or anything else named ``ts``) always wins.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: The directory holding the compatibility ``ts`` package.
COMPAT_DIR = Path(__file__).resolve().parent.parent / "compat"


def install_compat_path() -> bool:
    """Append :data:`COMPAT_DIR` to ``sys.path`` unless some ``ts`` is importable.

    Returns True when this call appended it. Called by the worker process at start and
    by :func:`~workers.handling.loader.load_handler`; calling it again is harmless.
    """
    entry = str(COMPAT_DIR)
    if entry in sys.path or importlib.util.find_spec("ts") is not None:
        return False
    sys.path.append(entry)
    return True
