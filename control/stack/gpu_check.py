"""``scripts/gpu-check``: prove that mqserve's workers run on the GPU, and what it buys.

On a machine with a CUDA GPU it builds an MLP archive with torch-model-archiver, starts a
private stack (``mqserve start`` with a temporary ``MQSERVE_HOME`` and free ports) and
registers the archive twice, with two workers each: ``mlp_gpu`` as its model-config
leaves it (no ``deviceType``: a GPU on a GPU host, as in TorchServe) and ``mlp_cpu``
with ``deviceType: cpu``. Then it checks that

* describe says ``deviceType`` ``gpu`` for ``mlp_gpu`` and ``cpu`` for ``mlp_cpu``, with
  ``gpu: true`` and a ``gpuUsage`` sample for each GPU worker, ``false``/``N/A`` for CPU;
* every worker answered, and from the device it should: the handler reports the device
  of the model's parameters, ``torch.cuda.get_device_name`` and its pid, so a GPU worker
  that silently fell back to the CPU fails the check;

and times the same number of predictions against each model (``batch_size`` 8; each
request asks for ``rows`` input rows, which the handler draws on its device, so the
payload stays small and the model's arithmetic dominates), printing requests per second
for both. The stack is stopped and its directory removed (kept, and named, when a check
failed). Exit status: 0 when every check passed, 1 when one failed (each is printed),
2 when there is no CUDA GPU here (nothing is started).

The checks (:func:`check_model`, :func:`parse_probe`, :func:`verdict`) are pure so that
unit tests cover them; :func:`run_check` with ``expect_gpu=False`` runs the whole
procedure on a CPU-only machine, which is how the tests exercise it end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_GPU = 2

GPU_MODEL = "mlp_gpu"
CPU_MODEL = "mlp_cpu"
WORKERS = 2
BATCH_SIZE = 8

MODEL_PY = '''\
"""A plain MLP: ``depth`` square layers of ``width`` with ReLU (the archive's modelFile)."""

import torch
from torch import nn

WIDTH = {width}
DEPTH = {depth}


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        layers = []
        for _ in range(DEPTH):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
'''

HANDLER_PY = '''\
"""Each request asks for ``rows`` input rows; they are drawn on the model's device, run
through the model as one batch, and each request gets back where it ran."""

import os

import torch
from ts.torch_handler.base_handler import BaseHandler


class MlpHandler(BaseHandler):
    def preprocess(self, data):
        self.rows = []
        for row in data:
            body = row.get("body") or row.get("data") or {}
            self.rows.append(max(int(body.get("rows", 1)), 1))
        width = next(self.model.parameters()).shape[1]
        return torch.randn(sum(self.rows), width, device=self.device)

    def postprocess(self, data):
        parameters = next(self.model.parameters()).device
        if parameters.type == "cuda":
            name = torch.cuda.get_device_name(parameters)
        else:
            name = "cpu"
        means = [chunk.mean().item() for chunk in torch.split(data, self.rows)]
        return [
            {
                "device": str(parameters),
                "device_name": name,
                "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "gpu_id": self.context.system_properties.get("gpu_id"),
                "mean": mean,
            }
            for mean in means
        ]
'''


class CheckError(RuntimeError):
    """The stack answered something the check cannot use; the message says what."""


@dataclass(frozen=True)
class Check:
    """One verdict: what was checked, whether it held, and what was seen."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Probe:
    """Where one prediction ran, as the handler reported it."""

    pid: int
    device: str
    device_name: str
    cuda_visible_devices: str
    gpu_id: int | None


@dataclass(frozen=True)
class Timing:
    """One model's timed run."""

    model: str
    device: str
    requests: int
    seconds: float
    errors: int

    @property
    def per_second(self) -> float:
        """Answered requests per second."""
        answered = self.requests - self.errors
        return answered / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Options:
    """What to build and how hard to push it."""

    requests: int = 256
    rows: int = 256
    concurrency: int = 16
    width: int = 1024
    depth: int = 8
    keep: bool = False


# -- pure checks ----------------------------------------------------------------------------


def parse_probe(body: bytes) -> Probe:
    """The handler's answer to one prediction; :class:`CheckError` when it is not one."""
    try:
        data = json.loads(body)
        gpu_id = data["gpu_id"]
        return Probe(
            pid=int(data["pid"]),
            device=str(data["device"]),
            device_name=str(data["device_name"]),
            cuda_visible_devices=str(data["cuda_visible_devices"]),
            gpu_id=None if gpu_id is None else int(gpu_id),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckError(f"not a probe answer: {body[:200]!r}") from exc


def check_model(doc: dict[str, Any], probes: Sequence[Probe], want_gpu: bool) -> list[Check]:
    """Describe's view and the workers' own answers agree with ``want_gpu``.

    ``doc`` is one element of describe's answer; ``probes`` every answer the model
    gave. Each described worker must have answered at least once, always from a CUDA
    device (``want_gpu``) or always from the CPU.
    """
    name = str(doc.get("modelName", "?"))
    wanted = "gpu" if want_gpu else "cpu"
    workers = doc.get("workers") or []
    said = f"describe says {doc.get('deviceType')!r}"
    if want_gpu and doc.get("deviceType") == "cpu":
        # The supervisor found no GPU: it reads CUDA_VISIBLE_DEVICES, else nvidia-smi.
        said += " (the supervisor saw no GPU: is nvidia-smi on PATH?)"
    checks = [
        Check(f"{name}: deviceType is {wanted}", doc.get("deviceType") == wanted, said),
        Check(f"{name}: {WORKERS} workers READY",
              [w.get("status") for w in workers] == ["READY"] * WORKERS,
              f"statuses {[w.get('status') for w in workers]}"),
    ]  # fmt: skip
    for worker in workers:
        checks.extend(_check_worker(name, worker, probes, want_gpu))
    return checks


def _check_worker(
    name: str, worker: dict[str, Any], probes: Sequence[Probe], want_gpu: bool
) -> list[Check]:
    wid, pid = worker.get("id"), worker.get("pid")
    usage = str(worker.get("gpuUsage"))
    if want_gpu:
        described = worker.get("gpu") is True and usage.startswith("gpuId::")
    else:
        described = worker.get("gpu") is False and usage == "N/A"
    mine = [p for p in probes if p.pid == pid]
    devices = sorted({f"{p.device} ({p.device_name})" for p in mine})
    if want_gpu:
        placed = bool(mine) and all(p.device.startswith("cuda") and p.gpu_id == 0 for p in mine)
    else:
        placed = bool(mine) and all(p.device == "cpu" and p.gpu_id is None for p in mine)
    where = ", ".join(devices) if mine else "no answer from this worker"
    return [
        Check(f"{name}: worker {wid} described on {'a GPU' if want_gpu else 'the CPU'}",
              described, f"gpu {worker.get('gpu')}, gpuUsage {usage!r}"),
        Check(f"{name}: worker {wid} (pid {pid}) computes on {'cuda' if want_gpu else 'cpu'}",
              placed, f"{len(mine)} answers from {where}"),
    ]  # fmt: skip


def verdict(checks: Sequence[Check]) -> int:
    """:data:`EXIT_OK` when every check held (and there was one), else :data:`EXIT_FAILED`."""
    return EXIT_OK if checks and all(c.ok for c in checks) else EXIT_FAILED


def format_report(checks: Sequence[Check], timings: Sequence[Timing], options: Options) -> str:
    """The checks, then the throughput table and the GPU/CPU ratio."""
    lines = [f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in checks]
    if timings:
        lines.append("")
        lines.append(
            f"throughput: {options.requests} requests of {options.rows} rows each, "
            f"concurrency {options.concurrency}, batch size {BATCH_SIZE}, "
            f"MLP {options.depth} x {options.width}"
        )
        lines.append(f"  {'model':<10}{'device':<10}{'answered':>10}{'seconds':>10}{'req/s':>10}")
        for t in timings:
            answered = t.requests - t.errors
            lines.append(
                f"  {t.model:<10}{t.device:<10}{answered:>10}{t.seconds:>10.2f}"
                f"{t.per_second:>10.1f}"
            )
        by_model = {t.model: t for t in timings}
        gpu, cpu = by_model.get(GPU_MODEL), by_model.get(CPU_MODEL)
        if gpu is not None and cpu is not None and cpu.per_second > 0:
            lines.append(f"  {GPU_MODEL} / {CPU_MODEL}: {gpu.per_second / cpu.per_second:.1f}x")
    failed = [c for c in checks if not c.ok]
    lines.append("")
    if failed:
        lines.append(f"gpu-check: {len(failed)} of {len(checks)} checks FAILED")
    else:
        lines.append(f"gpu-check: all {len(checks)} checks passed")
    return "\n".join(lines)


# -- the machine ------------------------------------------------------------------------------


def cuda_gpu() -> tuple[bool, str]:
    """Whether this machine has a CUDA GPU torch can use, and a line saying what it found."""
    import torch  # here, not at import: the checks above need no torch

    version = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return False, f"no CUDA GPU on this machine ({version})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return True, f"{len(names)} CUDA GPU(s): {', '.join(names)} ({version})"


def _tool(name: str) -> str:
    """A console script beside this interpreter (the virtualenv's), else on ``PATH``."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise CheckError(f"{name} is missing: run scripts/setup")
    return found


def build_archives(work: Path, store: Path, options: Options) -> None:
    """``store/mlp_gpu.mar`` and ``store/mlp_cpu.mar``: one MLP (fixed random weights,
    saved as a state dict), built by torch-model-archiver as a user builds one."""
    import torch

    src = work / "src"
    src.mkdir()
    (src / "model.py").write_text(MODEL_PY.format(width=options.width, depth=options.depth))
    (src / "handler.py").write_text(HANDLER_PY)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(options.depth):
        layers += [torch.nn.Linear(options.width, options.width), torch.nn.ReLU()]
    state = {f"layers.{k}": v for k, v in torch.nn.Sequential(*layers).state_dict().items()}
    torch.save(state, src / "model.pth")
    configs = {GPU_MODEL: "", CPU_MODEL: "deviceType: cpu\n"}
    for name, device_line in configs.items():
        config = src / f"{name}.yaml"
        config.write_text(f"batchSize: {BATCH_SIZE}\nmaxBatchDelay: 5\n{device_line}")
        subprocess.run(
            [_tool("torch-model-archiver"), "--model-name", name, "--version", "1.0",
             "--model-file", str(src / "model.py"), "--serialized-file", str(src / "model.pth"),
             "--handler", str(src / "handler.py"), "--config-file", str(config),
             "--export-path", str(store)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Stack:
    """A running private stack: its home and its two API base URLs."""

    home: Path
    management: str
    inference: str


@contextmanager
def private_stack(root: Path, store: Path, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """``mqserve start`` with its own home under ``root`` and free ports; stopped on exit."""
    home = root / "home"
    ports = {name: _free_port() for name in ("inference", "management", "metrics")}
    config = root / "config.properties"
    config.write_text(
        "".join(f"{name}_address=http://127.0.0.1:{port}\n" for name, port in ports.items())
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE",)}
    environ.pop("MQSERVE_REDIS_URL", None)
    environ.update(env or {})
    environ["MQSERVE_HOME"] = str(home)
    cli = [sys.executable, "-m", "control.cli"]
    started = subprocess.run(
        [*cli, "start", "--ts-config", str(config), "--model-store", str(store),
         "--enable-model-api", "--disable-token-auth"],
        env=environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if started.returncode != 0:
        raise CheckError(f"mqserve start failed:\n{started.stdout}{started.stderr}")
    try:
        yield Stack(
            home,
            f"http://127.0.0.1:{ports['management']}",
            f"http://127.0.0.1:{ports['inference']}",
        )
    finally:
        subprocess.run(
            [*cli, "stop"], env=environ, capture_output=True, text=True, timeout=300
        )  # fmt: skip


class Api:
    """JSON over HTTP to one stack, from any number of threads (a urllib3 pool)."""

    def __init__(self, stack: Stack, concurrency: int) -> None:
        self._stack = stack
        self._http = urllib3.PoolManager(maxsize=concurrency, retries=False)

    def register(self, name: str) -> None:
        params = f"url={name}.mar&initial_workers={WORKERS}&synchronous=true"
        reply = self._http.request(
            "POST", f"{self._stack.management}/models?{params}", timeout=600.0
        )
        if reply.status != 200:
            raise CheckError(f"registering {name}: {reply.status} {reply.data[:500]!r}")

    def describe(self, name: str) -> dict[str, Any]:
        reply = self._http.request("GET", f"{self._stack.management}/models/{name}", timeout=60.0)
        if reply.status != 200:
            raise CheckError(f"describing {name}: {reply.status} {reply.data[:500]!r}")
        docs = json.loads(reply.data)
        if not isinstance(docs, list) or not docs or not isinstance(docs[0], dict):
            raise CheckError(f"describing {name}: unexpected {reply.data[:500]!r}")
        return docs[0]

    def predict(self, name: str, rows: int) -> Probe | None:
        """One prediction; None when it was not answered with 200."""
        try:
            reply = self._http.request(
                "POST", f"{self._stack.inference}/predictions/{name}",
                body=json.dumps({"rows": rows}).encode(),
                headers={"Content-Type": "application/json"}, timeout=300.0,
            )  # fmt: skip
        except urllib3.exceptions.HTTPError:
            return None
        return parse_probe(reply.data) if reply.status == 200 else None


def timed_run(
    api: Api, name: str, options: Options, count: int
) -> tuple[float, list[Probe | None]]:
    """``count`` predictions ``concurrency`` at a time: (seconds, every answer)."""
    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
        answers = list(pool.map(lambda _: api.predict(name, options.rows), range(count)))
    return time.perf_counter() - begin, answers


def wait_for_usage(api: Api, name: str, timeout: float = 30.0) -> dict[str, Any]:
    """Describe ``name`` once every worker shows a GPU usage sample (or ``timeout`` has
    passed): the supervisor samples nvidia-smi every few seconds."""
    deadline = time.monotonic() + timeout
    while True:
        doc = api.describe(name)
        workers = doc.get("workers", [])
        sampled = all(str(w.get("gpuUsage")).startswith("gpuId::") for w in workers)
        if sampled or time.monotonic() > deadline:
            return doc
        time.sleep(0.5)


def run_check(
    options: Options,
    expect_gpu: bool,
    say: Callable[[str], None],
    env: dict[str, str] | None = None,
) -> tuple[list[Check], list[Timing]]:
    """The whole procedure (see the module doc); ``expect_gpu=False`` expects both models on
    the CPU, for a machine without GPUs. Raises :class:`CheckError` when the stack fails."""
    root = Path(tempfile.mkdtemp(prefix="mqs-gpu-", dir="/tmp"))  # short: Redis socket path
    checks: list[Check] = []
    timings: list[Timing] = []
    try:
        store = root / "store"
        store.mkdir()
        say(f"building the MLP archives ({options.depth} x {options.width}) in {root}")
        build_archives(root, store, options)
        say("starting a private mqserve stack")
        with private_stack(root, store, env) as stack:
            api = Api(stack, options.concurrency)
            for name, want_gpu in ((GPU_MODEL, expect_gpu), (CPU_MODEL, False)):
                say(f"registering {name} with {WORKERS} workers")
                api.register(name)
                # Warm-up, untimed: first CUDA calls, and every worker seen at least once.
                _, warm = timed_run(api, name, options, 4 * options.concurrency)
                say(f"timing {options.requests} predictions of {name}")
                seconds, answers = timed_run(api, name, options, options.requests)
                probes = [p for p in (*warm, *answers) if p is not None]
                doc = wait_for_usage(api, name) if want_gpu else api.describe(name)
                checks.extend(check_model(doc, probes, want_gpu))
                errors = sum(1 for a in answers if a is None)
                checks.append(
                    Check(f"{name}: every prediction answered", errors == 0,
                          f"{errors} of {options.requests} failed")
                )  # fmt: skip
                device = "cuda" if want_gpu else "cpu"
                timings.append(Timing(name, device, options.requests, seconds, errors))
    finally:
        if verdict(checks) == EXIT_OK and not options.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"kept {root} (logs in {root / 'home' / 'logs'})")
    return checks, timings


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-check",
        description="Check that mqserve's workers run on this machine's GPU, and time "
        "GPU against CPU. Exit 0: passed, 1: a check failed, 2: no GPU here.",
    )
    positive = _positive
    parser.add_argument("--requests", type=positive, default=256, help="timed predictions")
    parser.add_argument("--rows", type=positive, default=256, help="input rows per request")
    parser.add_argument("--concurrency", type=positive, default=16, help="requests in flight")
    parser.add_argument("--width", type=positive, default=1024, help="MLP layer width")
    parser.add_argument("--depth", type=positive, default=8, help="MLP layers")
    parser.add_argument("--keep", action="store_true", help="keep the stack's directory")
    args = parser.parse_args(argv)
    return Options(args.requests, args.rows, args.concurrency, args.width, args.depth, args.keep)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/gpu-check``; returns the exit status."""
    options = parse_args(argv)

    def say(line: str) -> None:
        print(f"gpu-check: {line}", file=sys.stderr, flush=True)

    present, found = cuda_gpu()
    say(found)
    if not present:
        say("nothing to check without a GPU")
        return EXIT_NO_GPU
    try:
        checks, timings = run_check(options, expect_gpu=True, say=say)
    except (CheckError, subprocess.SubprocessError, OSError) as exc:
        say(f"FAILED: {exc}")
        return EXIT_FAILED
    print(format_report(checks, timings, options))
    return verdict(checks)


if __name__ == "__main__":
    raise SystemExit(main())
