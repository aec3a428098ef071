"""The test tree itself: pytest imports test modules by their basename (rootdir-based
"prepend" import mode, no __init__.py in the tiers), so two tiers holding a file of the
same name make collection fail with "import file mismatch"."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_tiers() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert names, "no test modules found"
    assert [name for name, count in names.items() if count > 1] == []
