"""Which GPUs this host may use, found without initialising CUDA.

The supervisor must never touch CUDA itself (its children get their device through
``CUDA_VISIBLE_DEVICES``), so GPUs are discovered from the environment or ``nvidia-smi``.
"""

from __future__ import annotations

import os
import shutil
import subprocess


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
