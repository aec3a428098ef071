"""Two hosts, one Redis: a host cut off from the network has its share restarted on the
other, and when it comes back the model never has more serving workers than desired.

Each host is a network namespace made by the test (``ip netns``), joined to the root
namespace by a veth pair with its own /30; a supervisor runs inside each, reaching the
one redis-server in the root namespace over its veth, exactly as a second machine
would. Cutting a host off is taking the root side of its veth down: its packets are
dropped, no connection is reset, so its supervisor and worker simply stop hearing
from Redis (a partition, not a crash). The management and inference APIs run in the
root namespace, under a bounded load whose every request carries its own token, and a
sampler reads the serving workers from Redis every 0.1 s for the whole test.

Two cuts: h1 (one of the two workers) while h2 serves on, and then h2 (by now both
workers) with its supervisor stalled while the network comes back, so that its
workers must notice by themselves that their slots moved. After each, the stack must
settle: the host alive in Redis again and running no worker for a slot the other holds.

The test needs root and ``ip``; without them (or when the kernel refuses a
namespace) it is skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis

from control.core import keys, observed
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support import chaos
from tests.support.archives import build_mar
from tests.support.processes import (
    api_process,
    free_port,
    pings,
    started,
    stop_process,
    wait_for,
)

MODEL, VERSION = "noop", "1.0"
HOSTS = ("h1", "h2")
#: How long the cut-off host's share may take to serve on the other host: its slot
#: lease and presence expire 10 s after the last renewal, then a worker starts and loads.
MOVE_BOUND_S = 45.0
#: How long the stack may take to settle once the host is back. Its TCP connections
#: resume at their next retransmission (exponential back-off: up to ~13 s apart after
#: a 15-20 s cut) or after the clients' 30 s socket timeout, whichever comes first.
SETTLE_BOUND_S = 60.0
#: Requests the cut-off worker can have swallowed: the one its blocking pop received
#: after the cut (answered "Worker died." once its record expires), with margin.
MAX_FAILED = 4


@dataclass(frozen=True)
class Namespace:
    """One host's network namespace and the veth pair joining it to the root namespace."""

    name: str
    root_if: str
    ns_if: str
    root_addr: str
    ns_addr: str

    def pids(self) -> list[int]:
        """Every process running in the namespace."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _free_subnet() -> int:
    """A third octet N such that no address or route of this machine is in 10.250.N.0/24."""
    used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
    start = os.getpid() % 250
    for n in ((start + k) % 250 for k in range(250)):
        if f"10.250.{n}." not in used:
            return n
    raise AssertionError("every 10.250.N.0/24 is in use: no subnet for the namespaces")


def _kill_all(namespace: Namespace, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, everything in ``namespace``, until none is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in namespace.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            wait_for(lambda: not namespace.pids(), timeout, f"{namespace.name} to empty")
            return
        except AssertionError:
            if sig is signal.SIGKILL:
                raise


@contextmanager
def host_namespaces() -> Iterator[dict[str, Namespace]]:
    """Two namespaces ``mqs-<pid>-h1``/``-h2`` with links up; deleted (after everything
    in them is killed) on exit, whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip` (apt-get install iproute2)")
    n = _free_subnet()
    made: list[Namespace] = []
    try:
        for i, host in enumerate(HOSTS):
            base = 4 * i
            ns = Namespace(
                name=f"mqs-{os.getpid()}-{host}",
                root_if=f"mq{os.getpid()}{host}r",
                ns_if=f"mq{os.getpid()}{host}n",
                root_addr=f"10.250.{n}.{base + 1}",
                ns_addr=f"10.250.{n}.{base + 2}",
            )
            created = _ip("netns", "add", ns.name, check=False)
            if created.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
            made.append(ns)
            _ip("link", "add", ns.root_if, "type", "veth", "peer", "name", ns.ns_if)
            _ip("link", "set", ns.ns_if, "netns", ns.name)
            _ip("addr", "add", f"{ns.root_addr}/30", "dev", ns.root_if)
            _ip("link", "set", ns.root_if, "up")
            _ip("-n", ns.name, "addr", "add", f"{ns.ns_addr}/30", "dev", ns.ns_if)
            _ip("-n", ns.name, "link", "set", ns.ns_if, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
        yield {host: ns for host, ns in zip(HOSTS, made, strict=True)}
    finally:
        for ns in made:
            try:
                _kill_all(ns)
            finally:
                # Deleting one end of a veth deletes both; the namespace end went with
                # the namespace if the root end is already gone.
                _ip("link", "del", ns.root_if, check=False)
                _ip("netns", "del", ns.name, check=False)


@pytest.fixture
def namespaces() -> Iterator[dict[str, Namespace]]:
    """The two hosts' namespaces (see :func:`host_namespaces`)."""
    with host_namespaces() as made:
        yield made


@contextmanager
def shared_redis(workdir: Path, namespaces: dict[str, Namespace]) -> Iterator[tuple[str, int]]:
    """redis-server in the root namespace on 127.0.0.1 and each veth's root address,
    with a password (it listens beyond loopback); yields (password, port)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise AssertionError("redis-server is required: apt-get install -y redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_hex(16)
    port = free_port()
    binds = ["127.0.0.1", *(ns.root_addr for ns in namespaces.values())]
    # The password is given on stdin (a config file read from "-"), not in argv.
    argv = [exe, "-", "--port", str(port), "--bind", *binds, "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    with started(argv, grace=10, stdin=f"requirepass {password}\n".encode()):
        wait_for(lambda: pings(url), 10, "redis-server")
        yield password, port


@contextmanager
def netns_supervisors(
    namespaces: dict[str, Namespace], password: str, port: int, store: Path, workdir: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """``mqserve supervisor`` for each host, run inside its namespace with its own
    ``MQSERVE_HOME`` (``workdir/<host>``) and reaching Redis at its veth's root address,
    as tests.support.processes.supervisor_process runs one; yields them once each has
    announced itself. On exit all get SIGTERM together (they drain their workers; one
    stopping alone would hand its slots to the other, which would start workers just
    to drain them), and SIGKILL if one has not exited within 30 s."""
    client = redis.Redis.from_url(f"redis://:{password}@127.0.0.1:{port}/0")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for host, ns in namespaces.items():
            home = workdir / host
            home.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "MQSERVE_HOME": str(home), "CUDA_VISIBLE_DEVICES": ""}
            url = f"redis://:{password}@{ns.root_addr}:{port}/0"
            with (home / f"supervisor-{host}.log").open("wb") as log:
                procs[host] = subprocess.Popen(
                    ["ip", "netns", "exec", ns.name, sys.executable, "-m", "control.cli",
                     "supervisor", "--redis-url", url, "--model-store", str(store),
                     "--host-name", host],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
        for host, proc in procs.items():
            wait_for(
                lambda: client.exists(keys.host(host)) or proc.poll() is not None,  # noqa: B023
                60,
                f"supervisor {host}",
            )
            assert proc.poll() is None, (workdir / host / f"supervisor-{host}.log").read_text()
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            # Already signalled: waits, then SIGKILLs it and whatever ran below it.
            stop_process(proc, grace=30)
        client.close()


@dataclass(frozen=True)
class Sample:
    """What Redis said at one moment about the model version's workers."""

    at: float
    #: ``observed.serving_count``: the workers dispatch would give a request to.
    serving: int
    #: The hosts and ids of those workers.
    hosts: tuple[str, ...]
    wids: tuple[str, ...]


class Sampler:
    """Reads the serving workers of the model version every 0.1 s, in a thread.

    An error in the thread ends sampling and is raised by every later read, so a
    test cannot pass on samples that stopped.
    """

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="sampler")

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()

    def samples(self) -> list[Sample]:
        """Every sample so far, oldest first."""
        with self._lock:
            if self._error is not None:
                raise AssertionError("the sampler failed") from self._error
            return list(self._samples)

    def latest(self) -> Sample:
        """The newest sample (the thread has taken one before the test needs it)."""
        samples = self.samples()
        if not samples:
            raise AssertionError("no sample yet")
        return samples[-1]

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.1):
                records = observed.workers_of(self._client, MODEL, VERSION)
                serving = [r for r in records if r.state.serving]
                sample = Sample(
                    time.monotonic(),
                    observed.serving_count(records),
                    tuple(r.host for r in serving),
                    tuple(r.wid for r in serving),
                )
                with self._lock:
                    self._samples.append(sample)
        except Exception as exc:  # the root namespace's Redis never fails: a bug
            with self._lock:
                self._error = exc


def _hosts_now(sampler: Sampler) -> tuple[str, ...]:
    """The hosts of the serving workers at the latest sample, sorted."""
    return tuple(sorted(sampler.latest().hosts))


def _describe(client: redis.Redis, cut_off: Namespace) -> str:
    """What Redis and the cut-off namespace hold now (for a failure's message)."""
    records = [
        (r.wid, r.host, r.slot, r.state.value, r.reason)
        for r in observed.workers_of(client, MODEL, VERSION)
    ]
    slots = [client.get(keys.slot(MODEL, VERSION, i)) for i in range(2)]
    hosts = {h: bool(client.exists(keys.host(h))) for h in HOSTS}
    return f"records {records}, slot holders {slots}, hosts alive {hosts}, " + (
        f"processes in {cut_off.name}: {cut_off.pids()}"
    )


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie its stopped parent has not reaped counts)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@dataclass(frozen=True)
class Rig:
    """The running two-host stack a phase acts on."""

    client: redis.Redis
    namespaces: dict[str, Namespace]
    supervisors: dict[str, subprocess.Popen[bytes]]
    sampler: Sampler
    load: chaos.Load


def cut_off_and_back(rig: Rig, victim: str, survivor: str, *, stall: bool) -> chaos.Tally:
    """Cut ``victim`` off until ``survivor`` serves both slots, then connect it again and
    wait until the stack settles; record the figures; return the tally of the cut.

    With ``stall``, the victim's supervisor is stopped (SIGSTOP) before the network
    comes back and continued only once the victim's old workers have exited: they must
    see by themselves that their slots went to the survivor, never serving again
    meanwhile, as when a worker's connection recovers before its supervisor's.
    """
    client, sampler, load = rig.client, rig.sampler, rig.load
    cut_off = rig.namespaces[victim]
    supervisor = rig.supervisors[victim]
    records = observed.workers_of(client, MODEL, VERSION)
    kept = {r.wid for r in records if r.host == survivor and r.state.serving}
    stranded = [r.pid for r in records if r.host == victim]
    both = (survivor, survivor)

    cut_at = time.monotonic()
    _ip("link", "set", cut_off.root_if, "down")
    wait_for(lambda: _hosts_now(sampler) == both, MOVE_BOUND_S, f"{survivor} to run both")
    moved_at = time.monotonic()
    # The survivor's workers served throughout: the move only started new ones.
    assert kept <= set(sampler.latest().wids)
    assert {client.get(keys.slot(MODEL, VERSION, i)) for i in range(2)} == {survivor}

    if stall:
        os.kill(supervisor.pid, signal.SIGSTOP)
    back_at = time.monotonic()
    _ip("link", "set", cut_off.root_if, "up")
    if stall:
        try:
            wait_for(
                lambda: all(_gone(pid) for pid in stranded),
                SETTLE_BOUND_S,
                f"{victim}'s workers to drain by themselves",
            )
        finally:
            os.kill(supervisor.pid, signal.SIGCONT)

    def settled() -> bool:
        # The victim's supervisor is alive in Redis again, its old workers have exited
        # (only the supervisor runs in its namespace), the survivor runs both slots.
        return (
            client.exists(keys.host(victim)) == 1
            and cut_off.pids() == [supervisor.pid]
            and _hosts_now(sampler) == both
            and all(r.host == survivor for r in observed.workers_of(client, MODEL, VERSION))
            and {client.get(keys.slot(MODEL, VERSION, i)) for i in range(2)} == {survivor}
        )

    try:
        wait_for(settled, SETTLE_BOUND_S, f"the stack to settle with {victim} back")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {_describe(client, cut_off)}") from None
    settled_at = time.monotonic()
    # Still settled a few requests later: the victim does not start a third worker.
    sent = load.tally().sent
    wait_for(lambda: load.tally().sent >= sent + 10, 30, "more load")
    assert settled(), _describe(client, cut_off)
    # Predictions were answered again once the share had moved.
    wait_for(lambda: load.tally(moved_at).answered > 0, 30, "answers after the move")

    # Figures: the load sent while the host was cut off (converged: its share moved),
    # and while it came back (converged: settled, the host alive and workerless).
    during_cut = load.tally(cut_at, moved_at)
    back = "back, its supervisor stalled" if stall else "back"
    after = load.tally(back_at, settled_at)
    chaos.record(f"two hosts: {victim} cut off, its share moved", during_cut, moved_at - cut_at)
    chaos.record(f"two hosts: {victim} {back}, settled", after, settled_at - back_at)
    return during_cut


def test_a_host_cut_off_has_its_share_moved_and_never_doubles_back(
    tmp_path: Path, namespaces: dict[str, Namespace]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    build_mar(store / "noop.mar", MODEL, VERSION)
    with ExitStack() as stack:
        password, port = stack.enter_context(shared_redis(tmp_path / "redis", namespaces))
        local_url = f"redis://:{password}@127.0.0.1:{port}/0"
        client = redis.Redis.from_url(local_url, decode_responses=True)
        stack.callback(client.close)
        settings = Settings(
            model_store=store,
            enable_model_api=True,
            disable_token_authorization=True,
            redis_url=local_url,
            home=tmp_path / "api-home",
            worker_spawn_timeout=60,
        )
        management = stack.enter_context(api_process(settings, tmp_path / "api"))
        inference = stack.enter_context(api_process(settings, tmp_path / "api", "inference"))
        supervisors = stack.enter_context(
            netns_supervisors(namespaces, password, port, store, tmp_path)
        )
        # Whatever happens, every host is connected and running again before the
        # supervisors are stopped (a drain they could not report would take the whole
        # stop timeout, and a stopped process cannot act on SIGTERM).
        for host, ns in namespaces.items():
            stack.callback(_ip, "link", "set", ns.root_if, "up", check=False)
            stack.callback(supervisors[host].send_signal, signal.SIGCONT)
        sampler = stack.enter_context(Sampler(local_url))

        api = ManagementClient(management)
        response = api.register_model_with_params({"url": "noop.mar", "initial_workers": 2})
        assert response.status == 200, response.body
        # Fair share: with two live hosts, each runs one of the two slots.
        wait_for(lambda: _hosts_now(sampler) == HOSTS, 60, "one serving worker per host")
        load = stack.enter_context(
            chaos.Load(f"{inference}/predictions/{MODEL}", threads=2, rate=10.0, timeout=30.0)
        )
        wait_for(lambda: load.tally().answered >= 10, 30, "the load to be answered")
        rig = Rig(client, namespaces, supervisors, sampler, load)

        # h1 runs one of the two workers: h2 serves throughout, and the requests h1's
        # worker took when the network went are answered "Worker died.".
        first = cut_off_and_back(rig, "h1", "h2", stall=False)
        assert first.answered > 0 and first.failed <= MAX_FAILED, first
        # h2 now runs both: while h1 starts them afresh no worker can take a request
        # (503 at once, counted as failed); none is lost.
        cut_off_and_back(rig, "h2", "h1", stall=True)
        load.stop()

        samples = sampler.samples()
        peak = max(s.serving for s in samples)
        assert peak <= 2, [s for s in samples if s.serving > 2]
        assert len(samples) > 10 * (samples[-1].at - samples[0].at) * 0.5  # sampled all along
        total = load.tally()
        assert total.lost == 0, [s for s in load.shots() if s.outcome is chaos.Outcome.LOST]
