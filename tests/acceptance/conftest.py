"""Acceptance-tier hooks."""

from __future__ import annotations

import pytest

from tests.support import chaos


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the chaos tests' figures (sent/answered/failed/lost per fault) at the end."""
    chaos.terminal_summary(terminalreporter)
