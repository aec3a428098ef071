"""Truthful health: is every registered model served by at least ``min_workers``?

A model's default version is healthy when at least ``min_workers`` of its workers can
take requests (:data:`control.core.observed.SERVING`, the one rule dispatch uses too), so
``/ping`` says Unhealthy exactly when a prediction could be refused for want of
workers: while its workers start or load, after they crash (in back-off) or while they
drain. TorchServe instead counts loading and retrying workers as healthy (a deviation,
``docs/torchserve-compat.md#deviations``): a load balancer that trusts mqserve's
``/ping`` sends nothing to a server that would answer 503.
"""

from __future__ import annotations

import redis

from control.core.observed import serving_count, workers_of
from control.core.registry import Registry


def unhealthy_models(client: redis.Redis) -> list[str]:
    """``name:version`` of every default version with fewer serving workers than desired."""
    short = []
    for record in Registry(client).all_default_records():
        spec = record.spec
        if record.min_workers <= 0:
            continue
        if serving_count(workers_of(client, spec.model_name, spec.version)) < record.min_workers:
            short.append(f"{spec.model_name}:{spec.version}")
    return short


def healthy(client: redis.Redis) -> bool:
    """True when no model is short of serving workers (and when there are no models);
    False while Redis cannot be reached (nothing can be served then)."""
    try:
        return not unhealthy_models(client)
    except (redis.ConnectionError, redis.TimeoutError):
        return False
