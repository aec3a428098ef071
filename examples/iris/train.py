"""Train a tiny MLP on the Iris data and package it as ``iris.mar``.

    python examples/iris/train.py --export-path model_store

The data ships inside scikit-learn (nothing is downloaded). Training is seeded, so a
run reproduces the same model on the same machine. The script prints the accuracy on a
held-out 30 % of the data as ``held-out accuracy: 0.978 (44/45)`` and exits 1, writing
nothing, when it is not above :data:`MIN_ACCURACY`.

The archive is built by the real ``torch-model-archiver`` from a TorchScript ``iris.pt``
(what TorchServe's ``BaseHandler`` loads when an archive has no model file),
``iris_handler.py`` and ``index_to_name.json``. Intermediate files live in a temporary
directory; only ``iris.mar`` is written to the export path, atomically, replacing any
older one. Needs the ``examples`` extra: ``pip install -e '.[examples]'``.
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
HANDLER = HERE / "iris_handler.py"
MODEL_NAME = "iris"
MIN_ACCURACY = 0.9
TEST_FRACTION = 0.3

Tensor = torch.Tensor


class IrisNet(nn.Module):
    """4 -> 16 -> 3 MLP on raw measurements (cm); standardisation is part of the model."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean = nn.Buffer(mean.clone())
        self.std = nn.Buffer(std.clone())
        self.hidden = nn.Linear(4, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(n, 3)`` for measurements of shape ``(n, 4)``."""
        logits: torch.Tensor = self.out(torch.relu(self.hidden((x - self.mean) / self.std)))
        return logits


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """``(x_train, y_train, x_test, y_test, class names)``, a stratified split."""
    try:
        from sklearn.datasets import load_iris  # type: ignore[import-untyped]
        from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("scikit-learn is not installed: run .venv/bin/pip install -e '.[examples]'")
    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(
        iris.data, iris.target, test_size=TEST_FRACTION, stratify=iris.target, random_state=seed
    )
    return (
        torch.tensor(x_train, dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.long),
        torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.long),
        [str(name) for name in iris.target_names],
    )


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> IrisNet:
    """Full-batch Adam on cross-entropy; deterministic for a given seed."""
    torch.manual_seed(seed)
    model = IrisNet(x.mean(dim=0), x.std(dim=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """``(fraction correct, number correct)`` on ``x``, ``y``."""
    with torch.inference_mode():
        correct = int((model(x).argmax(dim=1) == y).sum())
    return correct / len(y), correct


def save_torchscript(model: nn.Module, path: Path) -> None:
    """Write ``model`` as TorchScript, the format TorchServe's BaseHandler loads for ``.pt``."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript, but TorchServe 0.12's BaseHandler loads a
        # serializedFile without a modelFile with torch.jit.load: the contract needs it.
        warnings.filterwarnings("ignore", r".*torch\.jit", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(path))


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


def build_archive(model: nn.Module, labels: list[str], export_path: Path) -> Path:
    """Build ``iris.mar`` in a temporary directory and move it into ``export_path``."""
    archiver = archiver_command()
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iris-build-") as tmp:
        build = Path(tmp)
        save_torchscript(model, build / "iris.pt")
        mapping = {str(index): name for index, name in enumerate(labels)}
        (build / "index_to_name.json").write_text(json.dumps(mapping, indent=2) + "\n")
        out = build / "out"
        out.mkdir()
        subprocess.run(
            [
                archiver,
                "--model-name", MODEL_NAME,
                "--version", "1.0",
                "--serialized-file", str(build / "iris.pt"),
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
        "--export-path", type=Path, required=True, help="directory that receives iris.mar"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and training")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch training steps")
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test, labels = load_data(args.seed)
    model = train(x_train, y_train, args.seed, args.epochs)
    acc, correct = accuracy(model, x_test, y_test)
    print(f"held-out accuracy: {acc:.3f} ({correct}/{len(y_test)})")
    if acc <= MIN_ACCURACY:
        print(f"accuracy must be above {MIN_ACCURACY}; no archive written", file=sys.stderr)
        return 1
    target = build_archive(model, labels, args.export_path)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
