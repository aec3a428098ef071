"""Reconcile: a pure function from desired and observed state to supervisor actions.

:func:`plan` knows nothing of Redis or processes. The supervisor snapshots the
registry, its own process table and the slot leases, calls :func:`plan`, and applies
the returned actions. Keeping the decision pure makes every rule testable as a table.

Slots. Replica ``i`` of a model version is slot ``i``; a host holds a slot through a
lease in Redis, so hosts sharing one Redis never run more than ``min_workers`` serving
replicas between them (a draining worker has given its slot up). A host claims free
slots below ``min_workers``, up to its fair share (``ceil(min_workers / live hosts)``),
keeps slots below ``max_workers`` (TorchServe leaves workers between min and max alone)
and drains slots at or above it.

Leases that expired. A slot whose lease is gone while this host still runs its worker
or keeps its back-off (the lease expired during a Redis outage longer than a lease) is
still this host's: the supervisor's renewal claims it again, and no second worker is
started for it. Only a lease another host holds takes a slot away (its worker drains).

Records that expired. A worker that wrote its record and whose record has since expired
(it missed three heartbeats: hung) is killed, except within ``RECORD_TTL`` of the end of
a Redis outage, during which a record may have expired while the worker was fine: its
next heartbeat writes it again.

Failures. A worker that exits without being asked to, fails to load, or is killed for
a timeout counts as a failure of its slot, and so does one that reports FAILED while it
still runs (its request loop died): it is killed after :data:`FAILED_GRACE`; and so does
a worker the supervisor could not start at all (the spawner raised ``OSError``). The slot
is retried with TorchServe's Fibonacci back-off (1, 1, 2, 3, 5, ... 1597 s) while the
slot has been failing for less than ``max_retry_timeout``; then it is left failed
(visible in describe) until the desired state changes.
"""

from __future__ import annotations

import math
import signal
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from control.core.observed import RECORD_TTL, WorkerState

#: TorchServe's ``BACK_OFF`` (seconds); the first retry waits BACK_OFF[1].
BACK_OFF = (0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597)
#: Extra seconds a draining worker gets beyond ``response_timeout`` before SIGKILL.
DRAIN_GRACE = 10.0
#: How long a running worker may report FAILED before it is killed. A worker whose
#: model failed to load reports FAILED and exits by itself at once (its exit code says
#: why); one still running after this cannot serve (e.g. its request loop died).
FAILED_GRACE = 5.0

#: The ``exit_code`` of a worker that exited while not our child (an adopted one): its
#: status cannot be read. No signal has this number.
EXIT_UNKNOWN = -256

Key = tuple[str, str]


@dataclass(frozen=True)
class Target:
    """Desired state of one model version."""

    model: str
    version: str
    min_workers: int
    max_workers: int
    generation: int = 1
    startup_timeout: float = 120.0
    response_timeout: float = 120.0
    max_retry_timeout: float = 300.0
    #: ``cpu`` never gets a GPU; ``gpu`` or ``""`` (unset) get one when the host has any.
    device_type: str = ""
    device_ids: tuple[int, ...] | None = None

    @property
    def key(self) -> Key:
        return (self.model, self.version)


@dataclass(frozen=True)
class Process:
    """A worker process owned by this supervisor, as last observed."""

    wid: str
    model: str
    version: str
    slot: int
    gpu: int
    spawned_at: float
    #: From the worker's record; STARTING while it has none (the supervisor writes a
    #: STARTING record before it spawns the worker).
    state: WorkerState = WorkerState.STARTING
    #: When ``state`` began (start of a load, of a request, of a drain).
    state_since: float = 0.0
    #: True when the worker's record is absent although the worker had reported past
    #: STARTING: it expired, because the worker stopped heartbeating (or Redis was down).
    record_lost: bool = False
    exit_code: int | None = None
    stop_sent_at: float | None = None
    #: Why the supervisor killed it, if it did.
    kill_reason: str = ""
    #: Failure text the worker reported (load errors), or why it could not be spawned.
    reason: str = ""
    #: True when the spawner raised (``reason`` says what): no process ever ran, so it
    #: is judged as a worker that exited at once, and ``exit_code`` stays None.
    spawn_failed: bool = False

    @property
    def key(self) -> Key:
        return (self.model, self.version)

    @property
    def running(self) -> bool:
        """A process exists and has not exited."""
        return self.exit_code is None and not self.spawn_failed


@dataclass(frozen=True)
class Backoff:
    """Failure history of one slot held by this host."""

    wid: str
    failures: int
    retry_at: float
    recovering_since: float
    generation: int
    reason: str


@dataclass(frozen=True)
class Observed:
    """Everything :func:`plan` may look at."""

    host: str
    now: float
    processes: tuple[Process, ...] = ()
    #: Slot leases of every host: ``{(model, version): {slot: host}}``.
    slots: Mapping[Key, Mapping[int, str]] = field(default_factory=dict)
    live_hosts: int = 1
    gpus: tuple[int, ...] = ()
    backoff: Mapping[tuple[str, str, int], Backoff] = field(default_factory=dict)
    spawn_timeout: float = 120.0
    #: When the supervisor's last Redis outage ended (its first tick that worked after
    #: one); None when it had none.
    outage_ended: float | None = None


# -- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Claim ``slot`` (if not held yet) and start a worker; ``wid`` None means a new id."""

    model: str
    version: str
    slot: int
    gpu: int
    wid: str | None = None


@dataclass(frozen=True)
class Stop:
    """Drain a worker and give up its slot: SIGTERM, the running request finishes,
    queued ones stay for the other workers."""

    wid: str


@dataclass(frozen=True)
class Kill:
    """SIGKILL a worker that is stuck; ``reason`` becomes its slot's failure."""

    wid: str
    reason: str


@dataclass(frozen=True)
class Forget:
    """A worker exited as asked: drop its record and, if ``release``, its slot lease;
    answer the requests it still held with ``answer`` "Worker died." (:func:`died_status`)."""

    wid: str
    model: str
    version: str
    slot: int
    release: bool
    answer: int = 500


@dataclass(frozen=True)
class Fail:
    """A worker failed: record ``backoff`` for its slot and show it as FAILED; answer the
    requests it held with ``answer`` "Worker died." (:func:`died_status`)."""

    wid: str
    model: str
    version: str
    slot: int
    backoff: Backoff
    answer: int = 500


@dataclass(frozen=True)
class Release:
    """Give up a slot this host holds with no process (and forget its failures)."""

    model: str
    version: str
    slot: int


@dataclass(frozen=True)
class Recovered:
    """The slot's worker loaded: its failure history is cleared."""

    model: str
    version: str
    slot: int


Action = Start | Stop | Kill | Forget | Fail | Release | Recovered


# -- the decision ---------------------------------------------------------------------


def plan(desired: Iterable[Target], observed: Observed) -> list[Action]:
    """The actions that move this host toward ``desired``. Pure and deterministic."""
    targets = {t.key: t for t in desired}
    actions: list[Action] = []
    for proc in observed.processes:
        actions.extend(_judge(proc, targets.get(proc.key), observed))
    # Every observed process occupies its slot for this tick, even one being killed or
    # reaped: its slot is decided again on the next tick, from the new facts.
    gpu_load = Counter(p.gpu for p in observed.processes if p.running)
    for key in sorted(set(targets) | _held_keys(observed)):
        actions.extend(_slots(key, targets.get(key), observed, gpu_load))
    # A slot in back-off here that another host took meanwhile (this one was cut off)
    # is not ours to retry: forget its failures.
    for model, version, slot in sorted(observed.backoff):
        holder = observed.slots.get((model, version), {}).get(slot)
        if holder is not None and holder != observed.host:
            actions.append(Release(model, version, slot))
    return actions


def _judge(proc: Process, target: Target | None, obs: Observed) -> list[Action]:
    """Decide about one owned process: reap, kill, drain or leave it."""
    if not proc.running:
        return [_reaped(proc, target, obs)]
    now = obs.now
    if proc.stop_sent_at is not None:
        grace = (target.response_timeout if target else 120.0) + DRAIN_GRACE
        if now - proc.stop_sent_at > grace:
            return [Kill(proc.wid, "")]
        return []
    if target is None or proc.slot >= target.max_workers or _moved(proc, obs):
        return [Stop(proc.wid)]
    reason = _stuck(proc, target, obs)
    if reason:
        return [Kill(proc.wid, reason)]
    return []


def _moved(proc: Process, obs: Observed) -> bool:
    """True when another host holds ``proc``'s slot: this host was cut off and the slot
    restarted there. The worker is drained (it drains itself too), not failed."""
    holder = obs.slots.get(proc.key, {}).get(proc.slot)
    return holder is not None and holder != obs.host


def _record_lost(proc: Process, obs: Observed) -> bool:
    """True when ``proc``'s record expired because the worker hung. After a Redis outage
    a record may have expired while the worker was fine: within ``RECORD_TTL`` of the
    outage's end (a few heartbeats) its absence says nothing."""
    after_outage = obs.outage_ended is not None and obs.now - obs.outage_ended < RECORD_TTL
    return proc.record_lost and not after_outage


def _state(proc: Process) -> WorkerState:
    """The state ``proc`` is judged by. One whose record is gone is taken as READY, its
    last known serving state: no load or request timeout applies to it, only the
    heartbeat rule (:func:`_record_lost`)."""
    return WorkerState.READY if proc.record_lost else proc.state


def _stuck(proc: Process, target: Target, obs: Observed) -> str:
    """Why ``proc`` must be killed, or ``""``."""
    state = _state(proc)
    age = obs.now - proc.state_since
    if state is WorkerState.STARTING and obs.now - proc.spawned_at > obs.spawn_timeout:
        return f"Worker process did not start within {obs.spawn_timeout:g} s"
    if state is WorkerState.LOADING and age > target.startup_timeout:
        return f"Model load exceeded startup_timeout of {target.startup_timeout:g} s"
    if state is WorkerState.BUSY and age > target.response_timeout:
        return f"Worker did not respond within response_timeout of {target.response_timeout:g} s"
    if _record_lost(proc, obs):
        return "Worker stopped sending heartbeats"
    if state is WorkerState.FAILED and age > FAILED_GRACE:
        return proc.reason or "Worker reported FAILED"
    return ""


def _reaped(proc: Process, target: Target | None, obs: Observed) -> Action:
    """An exited (or never started) process: a clean drain, or a failure of its slot."""
    asked = proc.stop_sent_at is not None and not proc.kill_reason
    answer = died_status(proc.exit_code, proc.kill_reason)
    if _moved(proc, obs):  # it drained itself: its slot runs elsewhere, no failure here
        return Forget(proc.wid, proc.model, proc.version, proc.slot, False, answer)
    if asked or target is None or proc.slot >= target.max_workers:
        # A drained worker gave its slot up when it was told to stop.
        release = proc.stop_sent_at is None
        return Forget(proc.wid, proc.model, proc.version, proc.slot, release, answer)
    previous = obs.backoff.get((proc.model, proc.version, proc.slot))
    failures = 1
    since = obs.now
    if previous is not None and previous.generation == target.generation:
        failures = previous.failures + 1
        since = previous.recovering_since
    delay = BACK_OFF[min(failures, len(BACK_OFF) - 1)]
    reason = proc.kill_reason or proc.reason or _exit_text(proc.exit_code)
    backoff = Backoff(proc.wid, failures, obs.now + delay, since, target.generation, reason)
    return Fail(proc.wid, proc.model, proc.version, proc.slot, backoff, answer)


def died_status(exit_code: int | None, kill_reason: str) -> int:
    """The status a dead worker's in-flight requests are answered with ("Worker died."):
    507 when it ended by a SIGKILL the supervisor gave no reason for (the kernel's OOM
    killer, which TorchServe recognises by exit code 137), else 500."""
    return 507 if exit_code == -signal.SIGKILL and not kill_reason else 500


def _exit_text(code: int | None) -> str:
    if code == EXIT_UNKNOWN:
        return "Worker died (exit status unknown: adopted from an earlier supervisor)"
    if code is not None and code < 0:
        return f"Worker died (signal {-code})"
    return f"Worker died (exit code {code})"


def _held_keys(obs: Observed) -> set[Key]:
    """Model versions this host holds a slot of, by lease, process or back-off."""
    held = {k for k, owners in obs.slots.items() if obs.host in owners.values()}
    return held | {p.key for p in obs.processes} | {(m, v) for m, v, _ in obs.backoff}


def _slots(
    key: Key,
    target: Target | None,
    obs: Observed,
    gpu_load: Counter[int],
) -> list[Action]:
    """Start, restart and release slots of one model version."""
    owners = obs.slots.get(key, {})
    procs = [p for p in obs.processes if p.key == key]
    # A draining worker takes no requests and has released its slot: a replacement
    # may start while it finishes its last request.
    busy = {p.slot for p in procs if p.stop_sent_at is None}
    failing = {s for m, v, s in obs.backoff if (m, v) == key}
    # A lease that expired under this host's worker or back-off (a Redis outage longer
    # than a lease) is still this host's: its renewal claims it again. Starting the
    # slot afresh would run a second worker beside the first, or skip the back-off.
    mine = {slot for slot, host in owners.items() if host == obs.host}
    mine |= (busy | failing) - owners.keys()
    actions: list[Action] = []
    if target is None:
        return [Release(*key, slot) for slot in sorted(mine - busy)]
    for slot in sorted(mine - busy):
        actions.extend(_idle_slot(key, slot, target, obs, gpu_load))
    for proc in procs:
        if proc.running and _state(proc).serving and (*key, proc.slot) in obs.backoff:
            actions.append(Recovered(*key, proc.slot))
    share = math.ceil(target.min_workers / max(obs.live_hosts, 1))
    kept = len([s for s in mine if s < target.max_workers])
    free = [s for s in range(target.min_workers) if s not in owners]
    for slot in free[: max(share - kept, 0)]:
        actions.append(Start(*key, slot, _pick_gpu(target, obs, gpu_load)))
    return actions


def _idle_slot(
    key: Key, slot: int, target: Target, obs: Observed, gpu_load: Counter[int]
) -> list[Action]:
    """A slot this host holds with no process: retry it, wait, or let it go."""
    backoff = obs.backoff.get((*key, slot))
    if slot >= target.max_workers:
        return [Release(*key, slot)]
    if backoff is None:
        return [Start(*key, slot, _pick_gpu(target, obs, gpu_load))]
    if backoff.generation != target.generation:
        # A new scale request: TorchServe replaces failed workers; start afresh.
        return [Start(*key, slot, _pick_gpu(target, obs, gpu_load), backoff.wid)]
    if obs.now - backoff.recovering_since >= target.max_retry_timeout:
        return []  # given up: stays FAILED until the desired state changes
    if obs.now >= backoff.retry_at:
        return [Start(*key, slot, _pick_gpu(target, obs, gpu_load), backoff.wid)]
    return []


def _pick_gpu(target: Target, obs: Observed, gpu_load: Counter[int]) -> int:
    """The GPU for a new worker of ``target`` on this host, or -1 for CPU.

    TorchServe's rules: ``deviceType: cpu`` never gets a GPU, and neither does anything
    on a host without GPUs; otherwise (``gpu`` or unset) the worker gets the least-loaded
    GPU, ties going round-robin in the host's order. ``deviceIds`` are indices into the
    GPUs this host may use (``obs.gpus``, e.g. ``CUDA_VISIBLE_DEVICES=2,3`` makes id 0
    GPU 2, as CUDA numbers them for TorchServe's workers) and restrict the choice to
    those; one id out of that range makes TorchServe ignore the whole list.
    """
    if target.device_type == "cpu" or not obs.gpus:
        return -1
    choices = obs.gpus
    ids = target.device_ids or ()
    if ids and all(0 <= i < len(obs.gpus) for i in ids):
        choices = tuple(dict.fromkeys(obs.gpus[i] for i in ids))
    gpu = min(choices, key=lambda g: (gpu_load[g], choices.index(g)))
    gpu_load[gpu] += 1
    return gpu
