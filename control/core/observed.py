"""Observed worker state: the records workers and supervisors publish to Redis.

A worker process owns its record ``mqs:o:worker:{wid}`` (see :mod:`control.core.keys`) and
refreshes its TTL with a heartbeat, so a process that dies disappears by itself. This
module is the single reader and writer of those records; the API reads them for
describe and for synchronous calls, supervisors and workers write them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

from control.core import keys
from control.core.redis_io import text

#: Seconds between heartbeats; records expire after three missed beats.
HEARTBEAT_INTERVAL = 1.0
RECORD_TTL = 3 * HEARTBEAT_INTERVAL
#: Slot leases (``keys.slot``) and a host's presence expire this long after the last
#: renewal by the host's supervisor.
LEASE_SECONDS = 10.0
#: How long a worker goes on serving while its slot lease is absent (its supervisor is
#: gone and has not come back to adopt it): then it drains itself. Longer than a lease,
#: so that a supervisor restarted by ``mqserve start`` (within seconds) or by hand
#: adopts its workers, and a lease that expired in a Redis outage is re-claimed first.
LEASE_GRACE = 30.0


class WorkerState(enum.StrEnum):
    """Life cycle of one worker process.

    The states, and what describe shows for each, are in
    ``docs/torchserve-compat.md#worker-life-cycle-and-back-off``.
    """

    STARTING = "STARTING"
    LOADING = "LOADING"
    READY = "READY"
    BUSY = "BUSY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"

    @property
    def serving(self) -> bool:
        """THE rule for "this worker can take requests" (see :data:`SERVING`)."""
        return self in SERVING


#: The one definition of a worker that can take requests: its model is loaded and it is
#: not draining (BUSY workers take the next request when the current one ends). Starting,
#: loading, failed (in back-off or given up) and draining workers cannot. Dispatch (its
#: Lua push receives these names), ``/ping``, KServe readiness, synchronous waits and
#: describe's worker ``status`` all count workers by this rule and nothing else.
SERVING: frozenset[WorkerState] = frozenset({WorkerState.READY, WorkerState.BUSY})


#: The worker HASH field with the supervisor's GPU usage text (:attr:`WorkerRecord.gpu_usage`).
GPU_USAGE_FIELD = "gpu_usage"


@dataclass(frozen=True)
class WorkerRecord:
    """One worker as last reported."""

    wid: str
    model: str
    version: str
    host: str
    pid: int
    gpu: int
    state: WorkerState
    started_at: float
    memory: int = 0
    reason: str = ""
    heartbeat: float = 0.0
    #: When ``state`` began: a load, a request or a drain is timed from here.
    since: float = 0.0
    #: Describe's ``gpuUsage`` text for the worker's GPU ("" = not sampled). Written by
    #: the host's supervisor from its ``nvidia-smi`` samples (``GPU_USAGE_FIELD``), never
    #: by :meth:`to_mapping`, so the worker's own heartbeats cannot overwrite it.
    gpu_usage: str = ""
    #: The replica slot (``keys.slot``) the worker serves; -1 in records of older versions.
    slot: int = -1

    def to_mapping(self) -> dict[FieldT, EncodableT]:
        """The HASH fields the worker and its supervisor write (all but ``gpu_usage``)."""
        return {
            "model": self.model,
            "version": self.version,
            "host": self.host,
            "pid": self.pid,
            "gpu": self.gpu,
            "state": self.state.value,
            "started_at": self.started_at,
            "memory": self.memory,
            "reason": self.reason,
            "heartbeat": self.heartbeat,
            "since": self.since,
            "slot": self.slot,
        }

    @classmethod
    def from_mapping(cls, wid: str, data: Mapping[str, str]) -> WorkerRecord:
        """Parse a HASH read from Redis (values as strings)."""
        return cls(
            wid=wid,
            model=data["model"],
            version=data["version"],
            host=data.get("host", ""),
            pid=int(data.get("pid", "-1")),
            gpu=int(data.get("gpu", "-1")),
            state=WorkerState(data["state"]),
            started_at=float(data.get("started_at", "0")),
            memory=int(float(data.get("memory", "0"))),
            reason=data.get("reason", ""),
            heartbeat=float(data.get("heartbeat", "0")),
            since=float(data.get("since", "0")),
            gpu_usage=data.get(GPU_USAGE_FIELD, ""),
            slot=int(data.get("slot", "-1")),
        )


def new_worker_id(client: redis.Redis) -> str:
    """Allocate a worker id, unique across hosts and never reused (9000, 9001, ...)."""
    n = int(client.incr(keys.WORKER_SEQ))
    return str(keys.FIRST_WORKER_ID + n - 1)


# KEYS: worker hash, workers index, slot lease   ARGV: ttl ms, wid, host, field, value, ...
# A serving state is written as DRAINING while another host holds the slot: a worker cut
# off from Redis whose slot moved meanwhile never shows as serving when it comes back.
_PUBLISH_GUARDED = """
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[3] then
  for i = 4, #ARGV - 1, 2 do
    if ARGV[i] == 'state' and ({}) then ARGV[i + 1] = '{}' end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
""".format(
    " or ".join(f"ARGV[i + 1] == '{s.value}'" for s in sorted(SERVING)),
    WorkerState.DRAINING.value,
)


def publish(
    client: redis.Redis, record: WorkerRecord, ttl: float = RECORD_TTL, lease: str = ""
) -> None:
    """Write (or refresh) ``record`` with its TTL and index it under its model version.

    With ``lease`` (the worker's slot lease, ``keys.slot``), in one step: a serving state
    is written as DRAINING when another host than ``record.host`` holds that lease.
    """
    key = keys.worker(record.wid)
    if lease:
        fields = [str(v) for pair in record.to_mapping().items() for v in pair]
        script = client.register_script(_PUBLISH_GUARDED)
        script(
            keys=[key, keys.workers(record.model, record.version), lease],
            args=[int(ttl * 1000), record.wid, record.host, *fields],
        )
        return
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping=record.to_mapping())
    pipe.pexpire(key, int(ttl * 1000))
    pipe.sadd(keys.workers(record.model, record.version), record.wid)
    pipe.execute()


def remove(client: redis.Redis, record: WorkerRecord) -> None:
    """Delete a worker's record when its process has exited."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.worker(record.wid))
    pipe.srem(keys.workers(record.model, record.version), record.wid)
    pipe.execute()


def read(client: redis.Redis, wid: str) -> WorkerRecord | None:
    """Worker ``wid``'s record, or None when it has expired or never existed."""
    raw = client.hgetall(keys.worker(wid))
    if not raw:
        return None
    return WorkerRecord.from_mapping(wid, {text(k): text(v) for k, v in raw.items()})


def workers_of(client: redis.Redis, name: str, version: str) -> list[WorkerRecord]:
    """Live workers of one model version, ordered by id; expired members are pruned."""
    index = keys.workers(name, version)
    wids = sorted(text(w) for w in client.smembers(index))
    if not wids:
        return []
    pipe = client.pipeline(transaction=False)
    for wid in wids:
        pipe.hgetall(keys.worker(wid))
    records: list[WorkerRecord] = []
    gone: list[str] = []
    for wid, raw in zip(wids, pipe.execute(), strict=True):
        if not raw:
            gone.append(wid)
            continue
        data = {text(k): text(v) for k, v in raw.items()}
        records.append(WorkerRecord.from_mapping(wid, data))
    if gone:
        client.srem(index, *gone)
    return sorted(records, key=lambda r: int(r.wid) if r.wid.isdigit() else 0)


def serving_count(records: list[WorkerRecord]) -> int:
    """How many of ``records`` can take requests (:data:`SERVING`)."""
    return sum(1 for r in records if r.state.serving)


def now() -> float:
    """Wall-clock seconds; records carry wall time because hosts compare them."""
    return time.time()
