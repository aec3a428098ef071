"""When the launcher restarts a crashed child, and when it gives up.

A pure policy over a child's crash history (monotonic times), so that it is tested
with a fake clock: the n-th crash within :attr:`RestartPolicy.window` seconds waits
``first_delay * 2 ** (n - 1)`` seconds (1, 2, 4, 8 ... capped at ``max_delay``) before
the restart, and the ``limit``-th crash within the window stops the stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential back-off with a crash-loop limit."""

    #: Crashes within :attr:`window` seconds after which the stack gives up.
    limit: int = 5
    window: float = 60.0
    first_delay: float = 1.0
    max_delay: float = 30.0

    def recent(self, crashes: Sequence[float], now: float) -> int:
        """How many of ``crashes`` happened within the window ending at ``now``."""
        return sum(1 for at in crashes if now - at < self.window)

    def decide(self, crashes: Sequence[float], now: float) -> float | None:
        """Seconds to wait before restarting, or None to give up.

        ``crashes`` are the child's crash times (the one just seen included); only
        those within the window count, so a child that crashed long ago starts over
        at ``first_delay``.
        """
        count = self.recent(crashes, now)
        if count >= self.limit:
            return None
        return float(min(self.first_delay * 2 ** max(count - 1, 0), self.max_delay))

    def describe(self) -> str:
        """The give-up rule in words, for logs and ``mqserve status``."""
        return f"{self.limit} times within {self.window:g} s"
