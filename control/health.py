"""Truthful health: is every registered model served by at least ``min_workers``?

TorchServe's ``/ping`` counts a worker as healthy unless it has failed for longer than
its retry window. Here a worker is live when its process reports in: starting,
loading, ready or busy. A worker that crashed and waits for its back-off, or drains,
is not live; so ``/ping`` turns unhealthy as soon as a model with ``min_workers > 0``
has fewer live workers than that, and healthy again when they are back.
"""

from __future__ import annotations

import redis

from control.observed import WorkerState, workers_of
from control.registry import Registry

LIVE = frozenset({WorkerState.STARTING, WorkerState.LOADING, WorkerState.READY, WorkerState.BUSY})


def unhealthy_models(client: redis.Redis) -> list[str]:
    """``name:version`` of every default version with fewer live workers than desired."""
    short = []
    for record in Registry(client).all_default_records():
        spec = record.spec
        if record.min_workers <= 0:
            continue
        live = sum(1 for w in workers_of(client, spec.model_name, spec.version) if w.state in LIVE)
        if live < record.min_workers:
            short.append(f"{spec.model_name}:{spec.version}")
    return short


def healthy(client: redis.Redis) -> bool:
    """True when no model is short of live workers (and when there are no models)."""
    return not unhealthy_models(client)
