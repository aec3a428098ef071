"""``scripts/gpu-check`` as an operator runs it, on a machine without a GPU.

Without a GPU the script must say so and exit 2. Its whole procedure (torch-model-
archiver, ``mqserve start``, register, predict, describe, time, ``mqserve stop``) runs
here too, through ``run_check(expect_gpu=False)``, which expects both models on the CPU.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from control.stack import gpu_check
from control.stack.gpu_check import CPU_MODEL, EXIT_NO_GPU, EXIT_OK, GPU_MODEL, Options

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_says_so_and_exits_2() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    result = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == EXIT_NO_GPU, result.stdout + result.stderr
    assert "no CUDA GPU on this machine" in result.stderr
    assert result.stdout == ""


def test_the_whole_procedure_on_cpu() -> None:
    lines: list[str] = []
    options = Options(requests=24, rows=8, concurrency=4, width=32, depth=2)
    checks, timings = gpu_check.run_check(
        options, expect_gpu=False, say=lines.append, env={"CUDA_VISIBLE_DEVICES": ""}
    )
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert failed == [], "\n".join(lines)
    assert gpu_check.verdict(checks) == EXIT_OK
    names = {c.name for c in checks}
    for model in (GPU_MODEL, CPU_MODEL):
        assert f"{model}: deviceType is cpu" in names
        assert sum(1 for n in names if n.startswith(f"{model}: worker ")) == 4
    assert [(t.model, t.requests, t.errors) for t in timings] == [
        (GPU_MODEL, 24, 0),
        (CPU_MODEL, 24, 0),
    ]
    assert not any(line.startswith("kept ") for line in lines)  # cleaned up after a pass
    report = gpu_check.format_report(checks, timings, options)
    assert report.endswith(f"gpu-check: all {len(checks)} checks passed")
