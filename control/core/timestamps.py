"""How mqserve shows a moment in its JSON: one format for every timestamp.

Redis holds epoch seconds (worker records, batch jobs, key expiries); what a client
reads is TorchServe's ``startTime`` format, ``2026-01-02T03:04:05.678Z``: UTC, with
milliseconds (truncated, not rounded) and a ``Z``. Describe's ``startTime``, a batch
job's ``created``/``expires`` and the key file's ``expiration time`` all use it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_time(epoch: float) -> str:
    """``epoch`` (seconds) as ``2026-01-02T03:04:05.678Z``."""
    when = datetime.fromtimestamp(epoch, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
