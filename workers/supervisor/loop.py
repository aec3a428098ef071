"""The supervisor: one per host, applying :func:`workers.supervisor.plan.plan` to real processes.

Each tick it snapshots the registry (desired state), its own process table, the worker
records and the slot leases (observed state), asks :func:`plan` what to do, and does it.
All decisions live in ``plan``; this module only observes and applies. What it cannot
decide at once it reports as a fact for the next tick: a spawner that raised leaves a
:class:`SpawnFailure` (``plan`` gives the slot its back-off), a lease renewal that finds
another host holding the slot changes the leases ``plan`` reads next (it drains the
worker), a record that is gone is reported as lost (``plan`` applies the heartbeat rule,
and the grace after a Redis outage, whose end is observed too).

It owns its worker processes: it starts them (``workers.worker.process``), reaps them, and
stops them with SIGTERM (drain) or SIGKILL (stuck). Workers outlive it: a supervisor
that starts on a host first adopts the live workers a previous incarnation left there
(:meth:`Supervisor.adopt`, from ``workers.supervisor.spawn.adopt_leftovers``), with their slots,
so a supervisor crash costs no request and a restart never duplicates workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.client import PubSub

from control.core import keys, observed
from control.core.devices import GpuSampler, usage_text
from control.core.observed import GPU_USAGE_FIELD, WorkerRecord, WorkerState
from control.core.registry import Registry, VersionRecord
from control.core.settings import Settings
from workers.model_files import ModelFiles
from workers.outage import Outage
from workers.supervisor import plan as reconcile
from workers.supervisor.plan import Action, Backoff, Observed, Process, Target
from workers.supervisor.spawn import Leftover, WorkerProcess
from workers.worker.batch import chunk_sender, requeue_held
from workers.worker.serving import answer_all

log = logging.getLogger(__name__)

#: Slot leases and the host's presence expire this long after the last renewal.
LEASE_SECONDS = observed.LEASE_SECONDS
#: Longest pause between ticks; a desired-state change wakes the loop at once.
TICK_SECONDS = 0.25

# 1: renewed; 2: it had expired (a Redis outage longer than a lease) and nobody took it,
# so it is this host's again; 0: another host holds it.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Only into a record that exists: a field written after the record expired would leave
# a hash without TTL and without the fields every reader needs.
_SET_USAGE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


class Spawner(Protocol):
    """Starts one worker process (``workers.supervisor.spawn.ForkSpawner`` in production)."""

    def __call__(
        self, wid: str, model: str, version: str, slot: int, gpu: int
    ) -> WorkerProcess: ...


@dataclass(frozen=True)
class SpawnFailure:
    """A worker the spawner could not start (it raised ``OSError``): no process, but its
    slot lease and STARTING record exist. Observed on the next tick as a process that
    never ran, so ``plan`` decides the slot's back-off as for any failed worker."""

    wid: str
    model: str
    version: str
    slot: int
    gpu: int
    at: float
    error: str


@dataclass
class Handle:
    """Bookkeeping for one owned worker process."""

    popen: WorkerProcess
    wid: str
    model: str
    version: str
    slot: int
    gpu: int
    spawned_at: float
    stop_sent_at: float | None = None
    kill_reason: str = ""
    reported: bool = False
    #: The GPU usage sample last copied into the worker's record (0: none yet).
    usage_seq: int = 0


def target_of(record: VersionRecord) -> Target:
    """The reconcile view of a registered version."""
    spec = record.spec
    return Target(
        model=spec.model_name,
        version=spec.version,
        min_workers=record.min_workers,
        max_workers=record.max_workers,
        generation=record.generation,
        startup_timeout=spec.startup_timeout,
        response_timeout=spec.response_timeout,
        max_retry_timeout=spec.max_retry_timeout,
        device_type=spec.device_type,
        device_ids=spec.device_ids,
    )


class Supervisor:
    """Reconciles this host's workers against the registry. Single-threaded by design."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        host: str,
        spawner: Spawner,
        gpus: tuple[int, ...] = (),
        clock: Callable[[], float] = time.time,
        frames: redis.Redis | None = None,
        usage: GpuSampler | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self._r = client
        #: A bytes-returning client for request frames (``client`` decodes to str).
        self._frames = frames if frames is not None else client
        self._registry = Registry(client)
        self._spawn = spawner
        self._gpus = gpus
        self._clock = clock
        self._handles: dict[str, Handle] = {}
        #: Workers whose spawn failed since the last tick, by worker id.
        self._unspawned: dict[str, SpawnFailure] = {}
        self._backoff: dict[tuple[str, str, int], Backoff] = {}
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._set_usage = client.register_script(_SET_USAGE)
        #: nvidia-smi samples for describe's gpuUsage, taken on ticks (hosts with GPUs).
        self._usage = usage if usage is not None else GpuSampler()
        #: This host's unpacked archives; a version's go when its last worker has exited.
        self._files = ModelFiles.of(settings.home, host)
        #: When the last Redis outage ended (clock time; None: none yet).
        self._outage_ended: float | None = None

    def adopt(self, leftovers: list[Leftover]) -> None:
        """Own the workers an earlier supervisor of this host left (their slot leases are
        already this host's): they are observed, renewed, drained and reaped like the
        ones this supervisor starts. A worker that was draining goes on draining. One
        that died meanwhile (no process) has its requests and batch chunk seen to now."""
        now = self._clock()
        for left in leftovers:
            record = left.record
            if left.process is None:
                self._bury(record.wid)
                continue
            handle = Handle(
                left.process,
                record.wid,
                record.model,
                record.version,
                record.slot,
                record.gpu,
                record.started_at,
                reported=record.state is not WorkerState.STARTING,
            )
            if record.state is WorkerState.DRAINING:
                handle.stop_sent_at = now
            self._handles[record.wid] = handle

    # -- one tick ------------------------------------------------------------------------

    def tick(self) -> list[Action]:
        """Observe, plan, apply; returns the actions taken (for logs and tests)."""
        targets = [target_of(r) for r in self._registry.desired()]
        snapshot = self.observe(targets)
        actions = reconcile.plan(targets, snapshot)
        for action in actions:
            self._apply(action)
        self._keep_alive()
        return actions

    def observe(self, targets: list[Target]) -> Observed:
        """The observed state :func:`plan` decides on."""
        now = self._clock()
        processes = tuple(self._observe_process(h) for h in self._handles.values())
        unspawned = tuple(_unspawned_process(f) for f in self._unspawned.values())
        return Observed(
            host=self.host,
            now=now,
            processes=processes + unspawned,
            slots=self._slot_owners(targets),
            live_hosts=max(self._live_hosts(), 1),
            gpus=self._gpus,
            backoff=dict(self._backoff),
            spawn_timeout=float(self.settings.worker_spawn_timeout),
            outage_ended=self._outage_ended,
        )

    def _observe_process(self, handle: Handle) -> Process:
        exit_code = handle.popen.poll()
        record = observed.read(self._r, handle.wid)
        if record is not None and record.state is not WorkerState.STARTING:
            handle.reported = True
        return Process(
            wid=handle.wid,
            model=handle.model,
            version=handle.version,
            slot=handle.slot,
            gpu=handle.gpu,
            spawned_at=handle.spawned_at,
            state=record.state if record is not None else WorkerState.STARTING,
            state_since=record.since if record is not None else handle.spawned_at,
            record_lost=record is None and handle.reported,
            exit_code=exit_code,
            stop_sent_at=handle.stop_sent_at,
            kill_reason=handle.kill_reason,
            reason=record.reason if record is not None else "",
        )

    def _slot_owners(self, targets: list[Target]) -> dict[reconcile.Key, dict[int, str]]:
        wanted: dict[reconcile.Key, set[int]] = {t.key: set(range(t.min_workers)) for t in targets}
        occupied = [(h.model, h.version, h.slot) for h in self._handles.values()]
        occupied += [(f.model, f.version, f.slot) for f in self._unspawned.values()]
        for model, version, slot in [*occupied, *self._backoff]:
            wanted.setdefault((model, version), set()).add(slot)
        owners: dict[reconcile.Key, dict[int, str]] = {}
        for key, slots in wanted.items():
            ordered = sorted(slots)
            values = self._r.mget([keys.slot(*key, i) for i in ordered]) if ordered else []
            owners[key] = {i: str(v) for i, v in zip(ordered, values, strict=True) if v}
        return owners

    def _live_hosts(self) -> int:
        return sum(1 for _ in self._r.scan_iter(match=keys.host("*"), count=100))

    # -- applying actions ----------------------------------------------------------------

    def _apply(self, action: Action) -> None:
        match action:
            case reconcile.Start():
                self._start(action)
            case reconcile.Stop(wid=wid):
                self._stop(self._handles[wid])
            case reconcile.Kill(wid=wid, reason=reason):
                handle = self._handles[wid]
                log.warning("killing worker %s: %s", wid, reason or "drain took too long")
                _signal(handle.popen, signal.SIGKILL)
                handle.kill_reason = reason
            case reconcile.Forget():
                self._forget(action)
            case reconcile.Fail():
                self._fail(action)
            case reconcile.Release(model=model, version=version, slot=slot):
                previous = self._backoff.pop((model, version, slot), None)
                if previous is not None:
                    self._drop_record(previous.wid, model, version)
                self._release(keys=[keys.slot(model, version, slot)], args=[self.host])
            case reconcile.Recovered(model=model, version=version, slot=slot):
                self._backoff.pop((model, version, slot), None)

    def _start(self, action: reconcile.Start) -> None:
        key = keys.slot(action.model, action.version, action.slot)
        owned = self._r.get(key) == self.host
        lease = int(LEASE_SECONDS * 1000)
        if not owned and not self._r.set(key, self.host, nx=True, px=lease):
            return  # another host claimed it first; the next tick sees that
        wid = action.wid or observed.new_worker_id(self._r)
        now = self._clock()
        record = WorkerRecord(
            wid,
            action.model,
            action.version,
            self.host,
            -1,
            action.gpu,
            WorkerState.STARTING,
            now,
            since=now,
            heartbeat=now,
            slot=action.slot,
        )
        observed.publish(self._r, record)
        log.info(
            "starting worker %s for %s:%s slot %d gpu %d",
            wid,
            action.model,
            action.version,
            action.slot,
            action.gpu,
        )
        try:
            popen = self._spawn(wid, action.model, action.version, action.slot, action.gpu)
        except OSError as exc:
            log.error("cannot start worker %s: %s", wid, exc)
            # A fact for the next tick's plan, which decides the slot's back-off.
            self._unspawned[wid] = SpawnFailure(
                wid, action.model, action.version, action.slot, action.gpu, now, str(exc)
            )
            return
        # Owned before anything else can fail (a Redis error): never an orphan process.
        self._handles[wid] = Handle(
            popen, wid, action.model, action.version, action.slot, action.gpu, now
        )
        observed.publish(self._r, dataclasses.replace(record, pid=popen.pid))

    def _stop(self, handle: Handle) -> None:
        log.info("draining worker %s (%s:%s)", handle.wid, handle.model, handle.version)
        _signal(handle.popen, signal.SIGTERM)
        handle.stop_sent_at = self._clock()
        self._release(keys=[keys.slot(handle.model, handle.version, handle.slot)], args=[self.host])

    def _forget(self, action: reconcile.Forget) -> None:
        self._unspawned.pop(action.wid, None)
        handle = self._handles.pop(action.wid, None)
        if handle is not None:
            self._bury(handle.wid, action.answer)
        self._release_files(action.model, action.version)
        self._backoff.pop((action.model, action.version, action.slot), None)
        self._drop_record(action.wid, action.model, action.version)
        if action.release:
            self._release(
                keys=[keys.slot(action.model, action.version, action.slot)], args=[self.host]
            )

    def _fail(self, action: reconcile.Fail) -> None:
        # The back-off first: if Redis fails below, the slot still waits before a retry.
        self._backoff[(action.model, action.version, action.slot)] = action.backoff
        handle = self._handles.pop(action.wid, None)
        unspawned = self._unspawned.pop(action.wid, None)
        if handle is not None:  # a process that never ran took no request
            self._bury(handle.wid, action.answer)
        self._release_files(action.model, action.version)
        log.warning(
            "worker %s of %s:%s failed (%d in a row): %s",
            action.wid,
            action.model,
            action.version,
            action.backoff.failures,
            action.backoff.reason,
        )
        if handle is not None:
            self._publish_failure(action, handle.gpu, handle.spawned_at)
        elif unspawned is not None:
            self._publish_failure(action, unspawned.gpu, unspawned.at)

    def _release_files(self, model: str, version: str) -> None:
        """Delete the version's unpacked archive once no worker of it is left on this host.

        The owned handles are the reference count: the exited worker was popped from
        them, and every worker started since (or still draining) holds one. A worker in
        back-off has exited, so its retry unpacks afresh.
        """
        if not any(h.model == model and h.version == version for h in self._handles.values()):
            self._files.remove(model, version)

    def _bury(self, wid: str, status: int = 500) -> None:
        """Answer dead worker ``wid``'s in-flight requests with ``status`` "Worker died."
        and requeue the batch-job chunk it held."""
        answered = answer_all(self._frames, keys.inflight(wid), status, "Worker died.")
        if answered:
            log.warning("answered %d request(s) of dead worker %s", answered, wid)
        # Its batch-job chunk too, now rather than after the broker's visibility timeout.
        requeued = requeue_held(self._r, wid, chunk_sender(self.settings))
        if requeued:
            log.warning("requeued %d batch-job item(s) of dead worker %s", requeued, wid)

    def _publish_failure(self, action: reconcile.Fail, gpu: int, started_at: float) -> None:
        now = self._clock()
        record = WorkerRecord(
            action.wid,
            action.model,
            action.version,
            self.host,
            -1,
            gpu,
            WorkerState.FAILED,
            started_at,
            reason=action.backoff.reason,
            since=now,
            heartbeat=now,
            slot=action.slot,
        )
        observed.publish(self._r, record, ttl=LEASE_SECONDS)

    def _drop_record(self, wid: str, model: str, version: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(keys.worker(wid))
        pipe.srem(keys.workers(model, version), wid)
        pipe.execute()

    # -- leases and presence ---------------------------------------------------------------

    def _keep_alive(self) -> None:
        """Renew this host's leases (claiming again the ones that expired while nobody
        took them), its worker records until the workers write their own, and its
        presence. A lease another host holds is left to it: the next tick's ``plan``
        sees that and drains the worker or forgets the slot's back-off."""
        lease = int(LEASE_SECONDS * 1000)
        for handle in self._handles.values():
            slot = keys.slot(handle.model, handle.version, handle.slot)
            if handle.stop_sent_at is not None:
                pass  # a draining worker gave its slot up
            elif (renewed := self._renew(keys=[slot], args=[self.host, lease])) == 0:
                log.error("another host holds the lease of %s; worker %s drains", slot, handle.wid)
            elif renewed == 2:
                log.warning("the lease of %s had expired; claimed it again", slot)
            if not handle.reported and handle.popen.poll() is None:
                self._r.pexpire(keys.worker(handle.wid), lease)
        idle = [(k, b.wid) for k, b in self._backoff.items()]
        idle += [((f.model, f.version, f.slot), f.wid) for f in self._unspawned.values()]
        for (model, version, index), wid in idle:
            self._renew(keys=[keys.slot(model, version, index)], args=[self.host, lease])
            self._r.pexpire(keys.worker(wid), lease)
        now = self._clock()
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(keys.host(self.host), mapping={"heartbeat": now, "gpus": len(self._gpus)})
        pipe.pexpire(keys.host(self.host), lease)
        pipe.execute()
        self._publish_gpu_usage()

    def _publish_gpu_usage(self) -> None:
        """Copy the latest nvidia-smi sample into each GPU worker's record (for describe).

        Once per sample and worker, not per tick; a worker whose record does not exist
        yet is tried again on the next tick. Sampling never blocks the tick.
        """
        if not self._gpus:
            return
        self._usage.poll()
        seq, texts = self._usage.latest()
        if seq == 0:
            return
        for handle in self._handles.values():
            if handle.gpu < 0 or handle.usage_seq == seq or handle.popen.poll() is not None:
                continue
            text = usage_text(texts, handle.gpu)
            if self._set_usage(keys=[keys.worker(handle.wid)], args=[GPU_USAGE_FIELD, text]):
                handle.usage_seq = seq

    # -- life cycle ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; desired-state changes wake the loop early.

        Nothing but ``stop`` ends it. A Redis error anywhere (a tick, the pub/sub
        subscription or its wait) is an outage: logged once, retried with capped
        back-off (``workers.outage``: 0.5 s .. 5 s) on a fresh pub/sub connection, while
        the workers go on serving from their own loops. Any other error is logged with
        its traceback (once while it repeats) and the next tick follows a short pause.
        """
        outage = Outage("supervisor", log)
        pubsub: PubSub | None = None
        last_error = ""
        try:
            while not stop.is_set():
                try:
                    if outage.ongoing:
                        # If this tick works, the outage ended now (plan excuses lost records).
                        self._outage_ended = self._clock()
                    if pubsub is None:
                        pubsub = self._r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                        pubsub.subscribe(keys.EVENTS)
                    self.tick()
                    outage.recovered()
                    last_error = ""
                    pubsub.get_message(timeout=TICK_SECONDS)
                except redis.RedisError as exc:
                    _close(pubsub)
                    pubsub = None
                    stop.wait(outage.failed(exc))
                except Exception as exc:
                    if repr(exc) != last_error:
                        log.exception("tick failed; going on")
                    last_error = repr(exc)
                    stop.wait(TICK_SECONDS)
        finally:
            _close(pubsub)
            self._usage.close()

    def shutdown(self, timeout: float) -> None:
        """Drain every worker, then give up leases and presence; bounded by ``timeout``.

        Workers get SIGTERM together and ``timeout`` seconds in all to finish their
        requests; whichever still runs then (a handler stuck in a call) is SIGKILLed.
        The whole drain takes at most ``timeout`` + 5 s, whatever the workers do.
        """
        for handle in self._handles.values():
            _signal(handle.popen, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for handle in self._handles.values():
            try:
                handle.popen.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                _signal(handle.popen, signal.SIGKILL)
        for handle in self._handles.values():  # SIGKILL cannot be ignored: this is brief
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.popen.wait(5.0)
        for handle in list(self._handles.values()):
            answer = reconcile.died_status(handle.popen.poll(), handle.kill_reason)
            self._forget(
                reconcile.Forget(
                    handle.wid, handle.model, handle.version, handle.slot, True, answer
                )
            )
        for failure in list(self._unspawned.values()):
            self._forget(
                reconcile.Forget(failure.wid, failure.model, failure.version, failure.slot, True)
            )
        for (model, version, slot), backoff in list(self._backoff.items()):
            self._apply(reconcile.Release(model, version, slot))
            self._drop_record(backoff.wid, model, version)
        self._r.delete(keys.host(self.host))


def _unspawned_process(failure: SpawnFailure) -> Process:
    """How ``plan`` sees a worker that could not be spawned."""
    return Process(
        wid=failure.wid,
        model=failure.model,
        version=failure.version,
        slot=failure.slot,
        gpu=failure.gpu,
        spawned_at=failure.at,
        state_since=failure.at,
        reason=f"spawn failed: {failure.error}",
        spawn_failed=True,
    )


def _close(pubsub: PubSub | None) -> None:
    """Close ``pubsub`` (if any) without raising; a broken connection is just dropped."""
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()


def _signal(popen: WorkerProcess, sig: signal.Signals) -> None:
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(sig)
