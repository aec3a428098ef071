"""The startup finder that lets ``import ts`` fall back to ``workers/compat/ts``.

The finder is exercised directly here, on private copies of ``sys.meta_path``; whole
interpreters (an installed wheel, a real ``ts`` earlier or later on the path) are in
``tests/acceptance/test_ts_launcher.py``.
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP = ROOT / "workers" / "compat" / "startup"
COMPAT_TS = ROOT / "workers" / "compat" / "ts" / "__init__.py"


def load_fallback() -> ModuleType:
    """A fresh copy of the module, as the installed top-level ``_mqserve_ts_fallback``."""
    spec = importlib.util.spec_from_file_location(
        "fallback_under_test", STARTUP / "_mqserve_ts_fallback.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OtherTs:
    """A finder that provides some other ``ts`` (an editable TorchServe, say)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        return ModuleSpec("ts", None) if fullname == "ts" else None


@pytest.fixture
def meta_path(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A private ``sys.meta_path`` holding only the standard path finder."""
    from importlib.machinery import PathFinder

    private: list[object] = [PathFinder]
    monkeypatch.setattr(sys, "meta_path", private)
    return private


def test_finds_the_compat_package_when_nothing_else_does(meta_path: list[object]) -> None:
    fallback = load_fallback()
    assert fallback.install() is True
    assert type(meta_path[-1]).__name__ == "TsFallbackFinder"
    spec = meta_path[-1].find_spec("ts", None)  # type: ignore[attr-defined]
    assert spec is not None
    assert Path(spec.origin).resolve() == COMPAT_TS
    assert spec.submodule_search_locations == [str(COMPAT_TS.parent)]


def test_answers_for_the_top_level_name_only(meta_path: list[object]) -> None:
    fallback = load_fallback()
    fallback.install()
    finder = meta_path[-1]
    for name in ("ts.launcher", "tsx", "workers", "torch"):
        assert finder.find_spec(name, None) is None  # type: ignore[attr-defined]


def test_yields_to_a_finder_appended_after_it(meta_path: list[object]) -> None:
    fallback = load_fallback()
    fallback.install()
    meta_path.append(OtherTs())
    assert meta_path[-2].find_spec("ts", None) is None  # type: ignore[attr-defined]


def test_install_is_idempotent_and_appends_last(meta_path: list[object]) -> None:
    fallback = load_fallback()
    assert fallback.install() is True
    assert load_fallback().install() is False  # a second copy recognises the first
    assert len(meta_path) == 2


def test_the_build_installs_both_files_at_the_top_of_site_packages() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = config["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["force-include"] == {
        "workers/compat/startup/mqserve_ts_fallback.pth": "mqserve_ts_fallback.pth",
        "workers/compat/startup/_mqserve_ts_fallback.py": "_mqserve_ts_fallback.py",
    }
    pth = (STARTUP / "mqserve_ts_fallback.pth").read_text()
    # site.py runs a .pth line only if it starts with "import"; one line, nothing else.
    assert pth == "import _mqserve_ts_fallback; _mqserve_ts_fallback.install()\n"
