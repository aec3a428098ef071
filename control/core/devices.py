"""GPUs: which ones a host may use, how busy they are, and how describe reports them.

The supervisor must never touch CUDA itself (its children get their device through
``CUDA_VISIBLE_DEVICES``), so GPUs are discovered from the environment or ``nvidia-smi``
(:func:`visible_gpus`), and their utilisation is sampled by the supervisor with a
background ``nvidia-smi`` (:class:`GpuSampler`), never on an API request.

Describe's GPU fields follow TorchServe 0.12:

* ``deviceType`` (:func:`described_device_type`) is ``gpu`` when model-config asked for
  ``gpu`` or said nothing and GPUs exist, else ``cpu``. mqserve's API process may run
  where there is no GPU, so "GPUs exist" means: a live supervisor announced some
  (``gpus`` in its ``mqs:o:host:{host}`` record, :func:`hosts_have_gpus`).
* a worker's ``gpuUsage`` is TorchServe's ``Accelerator.utilizationToString``
  (:meth:`GpuUsage.describe`), or :data:`USAGE_UNAVAILABLE` when ``nvidia-smi`` could
  not tell (TorchServe's own text, typo included), ``N/A`` on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

import redis

from control.core import keys

log = logging.getLogger(__name__)

#: What TorchServe's describe shows for a GPU worker whose usage it cannot read (no
#: ``nvidia-smi``, a failed or unparsable query): ``WorkerThread.getGpuUsage``'s text.
USAGE_UNAVAILABLE = "failed to obtained gpu usage"
#: The one ``nvidia-smi`` query the sampler runs: every GPU, one CSV line each.
USAGE_QUERY = (
    "--query-gpu=index,utilization.gpu,utilization.memory,memory.used",
    "--format=csv,noheader,nounits",
)
#: Seconds between samples; describe's ``gpuUsage`` is at most this old (plus a tick).
SAMPLE_INTERVAL = 5.0
#: ``nvidia-smi`` can hang on a wedged driver; a sample that takes longer is a failure.
SAMPLE_TIMEOUT = 10.0


def visible_gpus(env: dict[str, str] | None = None) -> tuple[int, ...]:
    """GPU indices this host may hand out, in order.

    ``CUDA_VISIBLE_DEVICES``, when set, is the authority (``""`` or ``-1`` means none);
    otherwise ``nvidia-smi`` lists the devices; no ``nvidia-smi`` means no GPUs.
    """
    environ = os.environ if env is None else env
    declared = environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return _parse_ids(declared)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return _parse_ids(",".join(out.split()))


def device_token(gpu: int, env: dict[str, str] | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a worker GPU ``gpu`` (an id from
    :func:`visible_gpus`) and nothing else.

    Where the host's own ``CUDA_VISIBLE_DEVICES`` names GPUs by UUID or MIG name, ids are
    positions in that list, and the worker must get the name at that position: the
    number would mean a different physical GPU.
    """
    environ = os.environ if env is None else env
    declared = environ.get("CUDA_VISIBLE_DEVICES")
    if declared:
        tokens = [t.strip() for t in declared.split(",") if t.strip()]
        ids = _parse_ids(declared)
        if gpu in ids:
            return tokens[ids.index(gpu)]
    return str(gpu)


def _parse_ids(text: str) -> tuple[int, ...]:
    ids: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            number = int(item)
        except ValueError:
            # UUIDs or MIG names: keep their position, which is what CUDA numbers.
            ids.append(len(ids))
            continue
        if number < 0:
            break  # CUDA stops at the first invalid id
        ids.append(number)
    return tuple(ids)


def default_startup_workers(configured: int, env: dict[str, str] | None = None) -> int:
    """TorchServe's worker count for startup models: the setting, else #GPUs, else #CPUs."""
    if configured > 0:
        return configured
    return len(visible_gpus(env)) or os.cpu_count() or 1


# -- utilisation --------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuUsage:
    """One GPU's utilisation, as one line of :data:`USAGE_QUERY`'s output."""

    index: int
    utilization_gpu: float
    utilization_memory: float
    memory_used_mib: int

    def describe(self) -> str:
        """TorchServe's text: ``gpuId::0 utilization.gpu::45 % utilization.memory::12 %
        memory.used::8,192 MiB`` (Java's ``MessageFormat``: thousands separators, at most
        three decimals, no trailing zeros)."""
        return (
            f"gpuId::{java_number(self.index)} "
            f"utilization.gpu::{java_number(_float32(self.utilization_gpu))} % "
            f"utilization.memory::{java_number(_float32(self.utilization_memory))} % "
            f"memory.used::{java_number(self.memory_used_mib)} MiB"
        )


def _float32(value: float) -> float:
    """``value`` rounded to a Java ``Float``, the type TorchServe keeps utilisation in."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def java_number(value: float) -> str:
    """``value`` as Java's ``MessageFormat`` prints a number in the default (US) locale:
    ``#,##0.###``, rounding the exact binary value half-even (``DecimalFormat`` since
    JDK 8), so ``5120`` is ``5,120`` and ``80.0`` is ``80``."""
    rounded = Decimal(value).quantize(Decimal("0.001"), rounding=ROUND_HALF_EVEN)
    text = f"{rounded:,f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def parse_usage(text: str) -> dict[int, GpuUsage]:
    """The GPUs in :data:`USAGE_QUERY`'s output, by ``nvidia-smi`` index.

    A line that does not parse (``[N/A]`` or ``[Not Supported]`` in a field, as MIG
    devices and some boards report) is left out, so that GPU's usage is unavailable, as
    in TorchServe, whose parser fails on such a line too.
    """
    usage: dict[int, GpuUsage] = {}
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            index = int(fields[0])
            gpu, memory = float(fields[1]), float(fields[2])
            used = int(fields[3])
        except ValueError:
            continue
        if index < 0 or not (math.isfinite(gpu) and math.isfinite(memory)):
            continue
        usage[index] = GpuUsage(index, gpu, memory, used)
    return usage


class Query(Protocol):
    """A running ``nvidia-smi`` (the part of ``subprocess.Popen`` the sampler uses)."""

    def poll(self) -> int | None: ...

    def communicate(self) -> tuple[str, str]: ...

    def kill(self) -> None: ...


def start_query() -> Query | None:
    """Start :data:`USAGE_QUERY` in the background; None when there is no ``nvidia-smi``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, *USAGE_QUERY],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


class GpuSampler:
    """Samples GPU utilisation with ``nvidia-smi`` every ``interval`` seconds, never
    blocking and without a thread.

    The supervisor is single-threaded on purpose (it forks its workers), so the sampler
    runs ``nvidia-smi`` as a child process and collects the answer on a later
    :meth:`poll`; the supervisor calls :meth:`poll` on every tick and copies
    :meth:`latest` into its GPU workers' records, where describe reads it: no API request
    ever runs ``nvidia-smi``. A query still running after ``timeout`` is killed and
    counts as a sample with nothing in it (every GPU's usage unavailable).
    """

    def __init__(
        self,
        interval: float = SAMPLE_INTERVAL,
        timeout: float = SAMPLE_TIMEOUT,
        start: Callable[[], Query | None] = start_query,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._timeout = timeout
        self._start = start
        self._clock = clock
        self._seq = 0
        self._texts: dict[int, str] = {}
        self._running: Query | None = None
        self._started_at: float | None = None

    def poll(self) -> None:
        """Collect a finished query, kill one past its timeout, start the next one when
        ``interval`` has passed since the last start (at once on the first call)."""
        now = self._clock()
        if self._running is not None:
            if self._running.poll() is not None:
                out, _ = self._running.communicate()
                ok = self._running.poll() == 0
                self._running = None
                self._record(parse_usage(out) if ok else {})
            elif self._started_at is not None and now - self._started_at > self._timeout:
                log.warning("nvidia-smi took over %g s; GPU usage unavailable", self._timeout)
                self.close()
                self._record({})
            return
        if self._started_at is not None and now - self._started_at < self._interval:
            return
        self._started_at = now
        try:
            self._running = self._start()
        except OSError as exc:
            log.warning("cannot run nvidia-smi, GPU usage unavailable: %s", exc)
            self._running = None
        if self._running is None:
            self._record({})

    def latest(self) -> tuple[int, dict[int, str]]:
        """``(sequence, {gpu index: describe text})``: sequence 0 until the first sample,
        then one more per sample, so a reader knows whether anything changed."""
        return self._seq, dict(self._texts)

    def close(self) -> None:
        """Kill a query in progress (the supervisor is stopping)."""
        if self._running is not None:
            with contextlib.suppress(OSError):
                self._running.kill()
                self._running.communicate()
            self._running = None

    def _record(self, usage: Mapping[int, GpuUsage]) -> None:
        self._seq += 1
        self._texts = {index: u.describe() for index, u in usage.items()}


def usage_text(texts: Mapping[int, str], gpu: int) -> str:
    """Describe's ``gpuUsage`` for a worker on ``gpu`` given a sample's texts."""
    if gpu < 0:
        return "N/A"
    return texts.get(gpu, USAGE_UNAVAILABLE)


# -- describe's deviceType ----------------------------------------------------------------


def described_device_type(requested: str, gpus_exist: bool) -> str:
    """TorchServe's ``deviceType``: ``gpu`` iff model-config said ``gpu`` or nothing
    (``requested`` is ``"gpu"`` or ``""``) and GPUs exist; otherwise ``cpu``."""
    return "gpu" if requested != "cpu" and gpus_exist else "cpu"


def device_type_of(client: redis.Redis, requested: str) -> str:
    """Describe's ``deviceType`` for a model whose config asked for ``requested``.

    Reads the live supervisors' announcements only when the answer depends on them.
    """
    if requested == "cpu":
        return "cpu"
    return described_device_type(requested, hosts_have_gpus(client))


def hosts_have_gpus(client: redis.Redis) -> bool:
    """True when a live supervisor announced at least one GPU (``mqs:o:host:*``)."""
    hosts = list(client.scan_iter(match=keys.host("*"), count=100))
    if not hosts:
        return False
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.hget(host, "gpus")
    for value in pipe.execute():
        try:
            if value is not None and int(value) > 0:
                return True
        except (TypeError, ValueError):
            continue
    return False
