"""Make ``import ts`` find mqserve's compatibility package, unless a real ``ts`` exists.

Installed at the top of site-packages together with ``mqserve_ts_fallback.pth`` (whose
one line runs :func:`install` at every interpreter start), so that scripts written for
TorchServe (``from ts.launcher import register_model``) and handlers (``from
ts.torch_handler.base_handler import BaseHandler``) work wherever mqserve is installed.

Never shadowing TorchServe is the point, so the finder is the **last** entry of
``sys.meta_path`` and answers only for the top-level name ``ts``, and only when no
other finder can: Python's path finder (every ``sys.path`` entry, ``PYTHONPATH`` and
every site-packages directory included, whatever their order) and any finder appended
after this one (e.g. an editable TorchServe's). Once ``ts`` came from here, its
submodules are found through the package's own ``__path__``.

Nothing is imported at startup beyond this module: the ``workers`` package is only
located (``importlib.util.find_spec``, which does not import it) when ``ts`` is
imported and missing. This module is a copy made at install time (the build
force-includes it), so it must not rely on where it lies.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from types import ModuleType

NAME = "ts"


class TsFallbackFinder:
    """A meta path finder for ``ts`` in mqserve's ``workers/compat``, as a last resort."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        """The compatibility ``ts`` package's spec, if nothing else provides ``ts``."""
        if fullname != NAME or self._found_elsewhere(fullname, path, target):
            return None
        import importlib.util  # only now: interpreter startup stays untouched

        workers = importlib.util.find_spec("workers")
        if workers is None or not workers.submodule_search_locations:
            return None
        places = [str(Path(place) / "compat") for place in workers.submodule_search_locations]
        return PathFinder.find_spec(NAME, places)

    def _found_elsewhere(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> bool:
        """Whether a finder after this one on ``sys.meta_path`` finds ``fullname``."""
        finders = list(sys.meta_path)
        after = finders[finders.index(self) + 1 :] if self in finders else []
        for finder in after:
            find = getattr(finder, "find_spec", None)
            if find is not None and find(fullname, path, target) is not None:
                return True
        return False


def install() -> bool:
    """Append the finder to the end of ``sys.meta_path`` once; True if this call did."""
    if any(type(f).__name__ == TsFallbackFinder.__name__ for f in sys.meta_path):
        return False
    sys.meta_path.append(TsFallbackFinder())
    return True
