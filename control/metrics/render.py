"""The metrics page: Prometheus text format 0.0.4, written as TorchServe writes it.

TorchServe's page comes from the Prometheus Java simpleclient 0.x (``write004``): each
family is a ``# HELP`` and a ``# TYPE`` line followed by its series, labels in the
family's declared order with a comma after every label (``{Level="Host",Hostname="h",}``)
and values as Java doubles (``8.0``). A family TorchServe registers prints its HELP and
TYPE lines even before it has a series (``Requests5XX`` on a server that never failed),
and so does every family of :data:`control.core.metrics_schema.FAMILIES` here.

After the built-in families come the model (handler) metric families of the catalogue
``keys.METRIC_FAMILIES`` that workers fill (:class:`control.metrics.recorder.ModelMetrics`), in
name order; histograms among them have simpleclient's default buckets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from control.core import keys, observed
from control.core.metrics_schema import (
    BATCH_QUEUE_DEPTH,
    BY_NAME,
    FAMILIES,
    PART_SEPARATOR,
    QUEUE_DEPTH,
    SUM_PART,
    WORKERS,
    Family,
    Kind,
    escape_label,
    family_from_json,
    format_value,
    parse_field,
)
from control.core.observed import WorkerState
from control.core.redis_io import text
from control.core.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Series = tuple[dict[str, str], float]


def render(client: redis.Redis, names: set[str] | None = None) -> str:
    """The page for the families in ``names`` (every family when None).

    Names that are no family are ignored, so an empty or unknown filter gives an empty
    page, as TorchServe's ``?name[]=`` does. The model family catalogue is read first,
    then every stored family in one pipeline;
    queue depth and workers by state are read live from the registry, the queues and
    the worker records. Raises redis errors when Redis cannot be read.
    """
    every = (*FAMILIES, *model_families(client))
    families = [f for f in every if names is None or f.name in names]
    stored = [f for f in families if f.stored]
    pipe = client.pipeline(transaction=False)
    for family in stored:
        pipe.hgetall(keys.metrics(family.name))
    hashes: dict[str, dict[str, float]] = {
        family.name: {text(k): float(v) for k, v in raw.items()}
        for family, raw in zip(stored, pipe.execute(), strict=True)
    }
    live = _live_series(client, {f.name for f in families if not f.stored})
    out: list[str] = []
    for family in families:
        out.append(f"# HELP {family.name} {family.help}\n")
        out.append(f"# TYPE {family.name} {family.kind}\n")
        if family.kind is Kind.HISTOGRAM:
            out.extend(_histogram_lines(family, hashes[family.name]))
        else:
            series = (
                live[family.name] if not family.stored else _stored(family, hashes[family.name])
            )
            out.extend(_line(family.name, family, labels, value) for labels, value in series)
    return "".join(out)


def model_families(client: redis.Redis) -> list[Family]:
    """The catalogue's model metric families, by name; built-in names and entries that
    do not decode are skipped (a built-in family is always rendered as built in)."""
    found = []
    for raw_name, raw in client.hgetall(keys.METRIC_FAMILIES).items():
        name = text(raw_name)
        family = None if name in BY_NAME else family_from_json(name, text(raw))
        if family is not None:
            found.append(family)
    return sorted(found, key=lambda f: f.name)


def _stored(family: Family, fields: dict[str, float]) -> list[Series]:
    return _sorted(family, ((parse_field(field), value) for field, value in fields.items()))


def _line(sample: str, family: Family, labels: dict[str, str], value: float) -> str:
    braces = f"{{{_labels(family, labels)}}}" if labels else ""
    return f"{sample}{braces} {format_value(value)}\n"


def _labels(family: Family, labels: dict[str, str]) -> str:
    """Labels in the family's order (undeclared ones after, sorted), each followed by ``,``."""
    order = [n for n in family.labels if n in labels]
    order += sorted(n for n in labels if n not in family.labels and n != "le")
    if "le" in labels:
        order.append("le")  # a bucket's bound always comes last, as simpleclient writes it
    return "".join(f'{n}="{escape_label(labels[n])}",' for n in order)


def _order(family: Family, labels: dict[str, str]) -> tuple[str, ...]:
    """Sort key of a series: its label values in the family's order, then any others."""
    declared = tuple(labels.get(n, "") for n in family.labels)
    return declared + tuple(f"{k}={v}" for k, v in sorted(labels.items()) if k not in family.labels)


def _sorted(family: Family, series: Iterable[Series]) -> list[Series]:
    return sorted(series, key=lambda item: _order(family, item[0]))


def _histogram_lines(family: Family, fields: dict[str, float]) -> Iterator[str]:
    """Cumulative ``_bucket`` lines, then ``_count`` and ``_sum``, per series."""
    per_series: dict[str, dict[str, float]] = {}
    for field, value in fields.items():
        series, _, part = field.rpartition(PART_SEPARATOR)
        per_series.setdefault(series, {})[part] = value
    bounds = [*(format_value(b) for b in family.buckets), "+Inf"]
    decoded = [(parse_field(series), parts) for series, parts in per_series.items()]
    for labels, parts in sorted(decoded, key=lambda item: _order(family, item[0])):
        total = 0.0
        for bound in bounds:
            total += parts.get(bound, 0.0)
            yield _line(f"{family.name}_bucket", family, {**labels, "le": bound}, total)
        yield _line(f"{family.name}_count", family, labels, total)
        yield _line(f"{family.name}_sum", family, labels, parts.get(SUM_PART, 0.0))


def _live_series(client: redis.Redis, wanted: set[str]) -> dict[str, list[Series]]:
    """Queue depth and workers by state for every registered version, when wanted."""
    result: dict[str, list[Series]] = {name: [] for name in wanted}
    if not wanted:
        return result
    versions = [(r.spec.model_name, r.spec.version) for r in Registry(client).desired()]
    for family, queue in ((QUEUE_DEPTH, keys.online_queue), (BATCH_QUEUE_DEPTH, keys.batch_queue)):
        if family not in wanted or not versions:
            continue
        pipe = client.pipeline(transaction=False)
        for name, ver in versions:
            pipe.llen(queue(name, ver))
        lengths: list[Any] = pipe.execute()
        for (name, ver), length in zip(versions, lengths, strict=True):
            labels = {"model_name": name, "model_version": ver}
            result[family].append((labels, float(int(length))))
    if WORKERS in wanted:
        for name, ver in versions:
            states = Counter(r.state for r in observed.workers_of(client, name, ver))
            # Every state, zeros included, so a state's series does not vanish and
            # reappear as workers move through it.
            for state in WorkerState:
                labels = {"model_name": name, "model_version": ver, "state": state.value}
                result[WORKERS].append((labels, float(states[state])))
    for name in wanted:
        result[name] = _sorted(BY_NAME[name], result[name])
    return result
