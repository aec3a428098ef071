"""Train a tiny point classifier and package it as ``diagonal.mar`` with custom metrics.

    python examples/custom_metrics/build.py --export-path model_store

The model says whether a point ``[x, y]`` lies above or below the diagonal ``y = x``: a
2 -> 16 -> 2 MLP trained, seeded, on points drawn in [-3, 3]^2 (nothing is downloaded).
The script prints the accuracy on held-out points as ``held-out accuracy: 0.995
(199/200)`` and exits 1, writing nothing, when it is not above :data:`MIN_ACCURACY`.

The archive is built by the real ``torch-model-archiver`` from a TorchScript
``diagonal.pt``, ``custom_metrics_handler.py`` (a ``BaseHandler`` subclass that records
counters, gauges and a histogram, TorchServe's ``examples/custom_metrics`` pattern) and
``index_to_name.json``. Only ``diagonal.mar`` is written to the export path, atomically.
Needs ``torch-model-archiver`` (the ``examples`` or ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
HANDLER = HERE / "custom_metrics_handler.py"
MODEL_NAME = "diagonal"
LABELS = ("below", "above")
MIN_ACCURACY = 0.95


class DiagonalNet(nn.Module):
    """Logits of (below, above) the diagonal for points of shape ``(n, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(2, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(torch.relu(self.hidden(x)))
        return logits


def make_points(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points uniform in [-3, 3]^2 and their labels (1: above ``y = x``)."""
    points = torch.rand(n, 2, generator=generator) * 6 - 3
    return points, (points[:, 1] > points[:, 0]).long()


def train(seed: int, steps: int) -> tuple[DiagonalNet, float, int, int]:
    """``(model, held-out accuracy, correct, held-out size)``; deterministic per seed."""
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = make_points(800, generator)
    x_test, y_test = make_points(200, generator)
    torch.manual_seed(seed)
    model = DiagonalNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x_train), y_train).backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        correct = int((model(x_test).argmax(dim=1) == y_test).sum())
    return model, correct / len(y_test), correct, len(y_test)


def archiver_command() -> str:
    """The ``torch-model-archiver`` next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("torch-model-archiver")
    if beside.exists():
        return str(beside)
    found = shutil.which("torch-model-archiver")
    if found is None:
        sys.exit(
            "torch-model-archiver is not installed: run .venv/bin/pip install -e '.[examples]'"
        )
    return found


def build_archive(model: nn.Module, export_path: Path) -> Path:
    """Build ``diagonal.mar`` in a temporary directory and move it into ``export_path``."""
    archiver = archiver_command()
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diagonal-build-") as tmp:
        build = Path(tmp)
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript; TorchServe 0.12's BaseHandler loads a
            # serializedFile without a modelFile with torch.jit.load, so the archive needs it.
            warnings.filterwarnings("ignore", r".*torch\.jit", DeprecationWarning)
            torch.jit.save(torch.jit.script(model), str(build / f"{MODEL_NAME}.pt"))
        mapping = {str(index): label for index, label in enumerate(LABELS)}
        (build / "index_to_name.json").write_text(json.dumps(mapping, indent=2) + "\n")
        out = build / "out"
        out.mkdir()
        subprocess.run(
            [
                archiver,
                "--model-name", MODEL_NAME,
                "--version", "1.0",
                "--serialized-file", str(build / f"{MODEL_NAME}.pt"),
                "--handler", str(HANDLER),
                "--extra-files", str(build / "index_to_name.json"),
                "--export-path", str(out),
                "-f",
            ],
            check=True,
        )  # fmt: skip
        target = export_path / f"{MODEL_NAME}.mar"
        partial = export_path / f".{MODEL_NAME}.mar.partial"
        shutil.copyfile(out / f"{MODEL_NAME}.mar", partial)
        os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate and package; 0 on success, 1 when the accuracy is too low."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--export-path", type=Path, required=True, help="directory that receives diagonal.mar"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and training")
    parser.add_argument("--steps", type=int, default=300, help="full-batch training steps")
    args = parser.parse_args(argv)
    model, accuracy, correct, total = train(args.seed, args.steps)
    print(f"held-out accuracy: {accuracy:.3f} ({correct}/{total})")
    if accuracy <= MIN_ACCURACY:
        print(f"accuracy must be above {MIN_ACCURACY}; no archive written", file=sys.stderr)
        return 1
    print(f"wrote {build_archive(model, args.export_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
