"""Describe and list from one Redis round trip each, over ``redis.asyncio``.

``GET /models/{name}[/{version}|/all]`` needs the version record(s), the default
version, the live workers' hashes, the online queue's length and, for a model whose
``device_type`` is not ``cpu``, whether a live supervisor announced GPUs; ``GET /models``
needs a page of names with their default versions' specs. Each is one Lua script
(:data:`_DESCRIBE`, :data:`_LIST`), so a describe costs one round trip however many
versions and workers it shows, and sees one consistent state: nothing is cached, so a
describe sent after a change returned reflects it. Worker ids whose hash has expired
are pruned from the version's index in the same script, as ``observed.workers_of`` does.

The bodies are built by ``control.management.service`` (:func:`describe_version`,
:func:`list_body`), to the byte what TorchServe answers. ``customized=true`` asks a
worker of the version through the model's queue (``control.core.dispatch``).
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio

from control.core import keys
from control.core.dispatch import Dispatcher
from control.core.errors import (
    InternalServerException,
    ModelNotFoundException,
    ModelVersionNotFoundException,
    ServiceUnavailableException,
)
from control.core.observed import WorkerRecord
from control.core.redis_io import text
from control.core.registry import VersionRecord, parse_record
from control.http.params import Params
from control.management.service import describe_version, list_body, page_bounds

# ARGV: name, version ('' = the default, 'all' = every version), model key, versions key,
#       version key prefix, workers index prefix, online queue prefix, worker key prefix,
#       host key pattern
# Returns {-1} (no such model), {-2} (no such version) or
# {0, default, gpus (0|1), {{version, version hash, {{wid, worker hash}...}, queue length}...}}
_DESCRIBE = """
local default = redis.call('HGET', ARGV[3], 'default')
if not default then return {-1} end
local versions
if ARGV[2] == 'all' then
  versions = redis.call('ZRANGE', ARGV[4], 0, -1)
elseif ARGV[2] == '' then
  versions = {default}
else
  versions = {ARGV[2]}
end
local out = {}
local want_gpus = false
for _, ver in ipairs(versions) do
  local record = redis.call('HGETALL', ARGV[5] .. ver)
  if #record == 0 then
    if ARGV[2] == '' then return {-1} end  -- the default was deleted meanwhile
    if ARGV[2] ~= 'all' then return {-2} end
  else
    for i = 1, #record, 2 do
      if record[i] == 'spec' then
        local ok, spec = pcall(cjson.decode, record[i + 1])
        if not ok or spec.device_type ~= 'cpu' then want_gpus = true end
      end
    end
    local index = ARGV[6] .. ver
    local workers, gone = {}, {}
    for _, wid in ipairs(redis.call('SMEMBERS', index)) do
      local hash = redis.call('HGETALL', ARGV[8] .. wid)
      if #hash > 0 then workers[#workers + 1] = {wid, hash} else gone[#gone + 1] = wid end
    end
    if #gone > 0 then redis.call('SREM', index, unpack(gone)) end
    out[#out + 1] = {ver, record, workers, redis.call('LLEN', ARGV[7] .. ver)}
  end
end
local gpus = 0
if want_gpus then
  local cursor = '0'
  repeat
    local page = redis.call('SCAN', cursor, 'MATCH', ARGV[9], 'COUNT', 100)
    cursor = page[1]
    for _, host in ipairs(page[2]) do
      local n = tonumber(redis.call('HGET', host, 'gpus'))
      if n and n > 0 then gpus = 1 end
    end
  until cursor == '0' or gpus == 1
end
return {0, default, gpus, out}
"""

# ARGV: models key, offset, limit, model key prefix, version key prefix ('<prefix><name>:<ver>')
# Returns {total, {{name, spec of its default version}...}}
_LIST = """
local total = redis.call('ZCARD', ARGV[1])
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if limit <= 0 or offset >= total then return {total, {}} end
local page = {}
for _, name in ipairs(redis.call('ZRANGE', ARGV[1], offset, offset + limit - 1)) do
  local default = redis.call('HGET', ARGV[4] .. name, 'default')
  if default then
    local spec = redis.call('HGET', ARGV[5] .. name .. ':' .. default, 'spec')
    if spec then page[#page + 1] = {name, spec} end
  end
end
return {total, page}
"""

_NO_MODEL, _NO_VERSION = -1, -2
#: ``keys.version(name, ver)`` is this prefix, the name, ``:`` and the version.
_VERSION_PREFIX = keys.version("", "")[:-1]


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A HASH as a script returns it (a flat field, value list) as ``str`` -> ``str``."""
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


class ManagementReads:
    """Describe and list over an asyncio client (bytes or decoding, either works).

    ``dispatcher`` sends ``customized=true`` describe requests to a worker; without it
    they are answered as for a model with no worker.
    """

    def __init__(self, client: redis.asyncio.Redis, dispatcher: Dispatcher | None = None) -> None:
        self.client = client
        self._dispatcher = dispatcher
        self._describe = client.register_script(_DESCRIBE)
        self._list = client.register_script(_LIST)

    async def list_models(self, params: Params) -> dict[str, Any]:
        """``GET /models`` with TorchServe's pagination: one round trip."""
        offset, limit = page_bounds(params)
        total, rows = await self._list(
            keys=[], args=[keys.MODELS, offset, limit, keys.model(""), _VERSION_PREFIX]
        )
        page = [(text(name), json.loads(spec)["url"]) for name, spec in rows]
        return list_body(offset, limit, page, int(total))

    async def describe(
        self, name: str, version: str | None, customized: bool
    ) -> list[dict[str, Any]]:
        """``GET /models/{name}[/{version}|/all]``: always a list; one round trip, and one
        more request through the model's queue with ``customized`` (not for ``all``)."""
        result = await self._describe(
            keys=[],
            args=[
                name, version or "", keys.model(name), keys.versions(name),
                keys.version(name, ""), keys.workers(name, ""), keys.online_queue(name, ""),
                keys.worker(""), keys.host("*"),
            ],
        )  # fmt: skip
        code = int(result[0])
        if code == _NO_MODEL:
            raise ModelNotFoundException(f"Model not found: {name}")
        if code == _NO_VERSION:
            raise ModelVersionNotFoundException(
                f"Model version: {version} does not exist for model: {name}"
            )
        default, gpus_exist = text(result[1]), int(result[2]) == 1
        docs: list[dict[str, Any]] = []
        records: list[VersionRecord] = []
        for ver, raw, workers, pending in result[3]:
            ver = text(ver)
            record = parse_record(_pairs(raw), is_default=ver == default)
            live = sorted(
                (WorkerRecord.from_mapping(text(wid), _pairs(h)) for wid, h in workers),
                key=lambda r: r.wid,
            )
            live.sort(key=lambda r: int(r.wid) if r.wid.isdigit() else 0)  # as workers_of
            records.append(record)
            docs.append(describe_version(record, live, int(pending), gpus_exist))
        if customized and version != "all":
            docs[0]["customizedMetadata"] = await self._customized(records[0])
        return docs

    async def _customized(self, record: VersionRecord) -> dict[str, Any]:
        """The handler's ``describe_handle`` output, asked through the model's queue."""
        name = record.spec.model_name
        no_worker = ServiceUnavailableException(
            f'Model "{name}" has no worker to serve describe request. '
            "Please use scale workers API to add workers."
        )
        failed = InternalServerException("Failed to get customized model matadata.")
        if self._dispatcher is None:
            raise no_worker
        try:
            outcome = await self._dispatcher.send(
                name, record.spec.version, (), {"describe": "True"}, kind="describe"
            )
        except ServiceUnavailableException:  # no worker, or its queue is full
            raise no_worker from None
        except InternalServerException:
            raise failed from None
        if outcome.reply.error is not None or outcome.reply.status != 200:
            raise failed
        try:
            metadata = json.loads(outcome.reply.body)
        except ValueError:
            return {}
        return metadata if isinstance(metadata, dict) else {}
