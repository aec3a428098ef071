"""Running one chunk of a batch job (``control.jobs``) inside a model worker.

A chunk is the item range ``[start, end)`` of one job. The worker reads the items,
runs them through the model in batches of the job's ``batch_size`` and records each
result with its count in one Lua script, so that:

* a chunk delivered twice (Celery redelivers the message of a worker that died, and
  a message may even reach two workers) never counts an item twice: a result is
  written with HSETNX and counted only when it was new;
* items that already have a result are not run again;
* a job that was cancelled, finished or expired is skipped, and a cancellation seen
  after a batch stops the rest of the chunk.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import Any

import orjson
import redis

from control import keys
from control.jobs import FINISHED, QUEUED, RUNNING
from workers.handling.types import HandlerFailure, InferenceReply, InferenceRequest, Parameter
from workers.serving import Handles

log = logging.getLogger(__name__)

# KEYS: job   ARGV: (none). Returns {status, content_type, batch_size}; queued -> running.
_BEGIN = """
local fields = redis.call('HMGET', KEYS[1], 'status', 'content_type', 'batch_size')
if not fields[1] then return false end
if fields[1] == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running')
  fields[1] = 'running'
end
return fields
"""

# KEYS: job, items, results   ARGV: index, result JSON, ok ('1'/'0'), repeated.
# Returns the job's status after recording (false when the job has expired).
_RECORD = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local ok, bad = 0, 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    if ARGV[i + 2] == '1' then ok = ok + 1 else bad = bad + 1 end
  end
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
local done = redis.call('HINCRBY', KEYS[1], 'done', ok)
local failed = redis.call('HINCRBY', KEYS[1], 'failed', bad)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if done + failed >= total and (status == 'queued' or status == 'running') then
  if done > 0 then status = 'succeeded' else status = 'failed' end
  redis.call('HSET', KEYS[1], 'status', status)
  redis.call('DEL', KEYS[2])
end
return status
"""

#: The error recorded for an item whose batch raised something other than a
#: HandlerFailure (a bug outside the handler): the job must still finish.
INTERNAL_ERROR = (500, "Internal Server Error")


def run_chunk(client: redis.Redis, model: Handles, job_id: str, start: int, end: int) -> int:
    """Run items ``start`` .. ``end - 1`` of ``job_id``; returns how many went to the model.

    Never raises for a failing model: a batch the model fails as a whole gives each of
    its items that status and message. Redis errors propagate; running the chunk again
    is always safe (items with a result are neither re-run nor re-counted).
    """
    begun = client.register_script(_BEGIN)(keys=[keys.job(job_id)])
    if not begun or _text(begun[0]) not in (QUEUED, RUNNING):
        return 0
    content_type, batch_size = _text(begun[1] or ""), max(int(begun[2] or 1), 1)
    pending = _pending(client, job_id, range(start, end))
    record = client.register_script(_RECORD)
    job_keys = [keys.job(job_id), keys.job_items(job_id), keys.job_results(job_id)]
    ran = 0
    for offset in range(0, len(pending), batch_size):
        batch = pending[offset : offset + batch_size]
        args: list[Any] = []
        for index, result, ok in _run_batch(model, job_id, content_type, batch):
            args.extend((index, result, "1" if ok else "0"))
        ran += len(batch)
        status = record(keys=job_keys, args=args)
        if status is None or _text(status) in FINISHED:
            break
    return ran


def _pending(client: redis.Redis, job_id: str, indices: range) -> list[tuple[int, bytes]]:
    """``(index, input)`` of the items in ``indices`` that exist and have no result."""
    fields = [str(i) for i in indices]
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.job_items(job_id), fields)
    pipe.hmget(keys.job_results(job_id), fields)
    items, results = pipe.execute()
    return [
        (index, item.encode() if isinstance(item, str) else item)
        for index, item, result in zip(indices, items, results, strict=True)
        if item is not None and result is None
    ]


def _run_batch(
    model: Handles, job_id: str, content_type: str, batch: Sequence[tuple[int, bytes]]
) -> list[tuple[int, bytes, bool]]:
    """``(index, result JSON, succeeded)`` for each item of one batch."""
    requests = [
        InferenceRequest(f"{job_id}:{i}", {}, [Parameter("body", content_type, item)])
        for i, item in batch
    ]
    try:
        replies = model.handle(requests)
    except HandlerFailure as exc:
        return [(i, _error(exc.status, exc.message), False) for i, _ in batch]
    except Exception:  # not the handler's failure: record it rather than stall the job
        log.exception("batch job %s: items %d.. failed", job_id, batch[0][0])
        return [(i, _error(*INTERNAL_ERROR), False) for i, _ in batch]
    return [(i, *_result(reply)) for (i, _), reply in zip(batch, replies, strict=True)]


def _result(reply: InferenceReply) -> tuple[bytes, bool]:
    """The stored JSON for one reply; a status of 400 or more counts as a failed item.

    A successful body is kept as ``result``: its JSON value when it parses as JSON, else
    its text, or as ``resultBase64`` when it is not UTF-8 (an image, a tensor).
    """
    if reply.status >= 400:
        text = reply.body.decode("utf-8", errors="replace")
        return _error(reply.status, text or reply.reason), False
    entry: dict[str, Any] = {"status": reply.status}
    try:
        entry["result"] = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        try:
            entry["result"] = reply.body.decode("utf-8")
        except UnicodeDecodeError:
            entry["resultBase64"] = base64.b64encode(reply.body).decode("ascii")
    return orjson.dumps(entry), True


def _error(status: int, message: str) -> bytes:
    return orjson.dumps({"status": status, "error": message})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
