"""Archives built by the real torch-model-archiver 0.12.0 load and serve through
``workers.handling`` after ``ModelStore`` resolves and extracts them.

Needs the ``torch-model-archiver`` console script beside this interpreter (test extras).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from control.archives.store import ModelStore
from control.core.spec import ModelSpec
from tests.support.handlers import HANDLERS, isolated_imports, make_request
from workers.handling import load_handler

ARCHIVER = Path(sys.executable).parent / "torch-model-archiver"
INPUTS = [[1.0, 2.0], [0.0, 1.0]]
#: INPUTS through weight [[1, 2], [3, 4]] and bias [0.5, -0.5].
OUTPUTS = [[5.5, 10.5], [2.5, 3.5]]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path) -> Iterator[None]:
    with isolated_imports(tmp_path):
        yield


def _sources(root: Path) -> Path:
    """The archiver's inputs: a TorchScript model, a BaseHandler subclass, a config."""
    src = root / "src"
    src.mkdir()
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates scripting
        torch.jit.script(layer).save(str(src / "model.pt"))
    shutil.copy(HANDLERS / "tensor_handler.py", src / "handler.py")
    (src / "model-config.yaml").write_text("batchSize: 2\nhandler:\n  note: from the archive\n")
    (src / "notes.txt").write_text("extra file\n")
    return src


def _archive(src: Path, store: Path, archive_format: str) -> None:
    command = [
        str(ARCHIVER),
        "--model-name",
        "tiny",
        "--version",
        "1.0",
        "--serialized-file",
        str(src / "model.pt"),
        "--handler",
        str(src / "handler.py"),
        "--extra-files",
        str(src / "notes.txt"),
        "--config-file",
        str(src / "model-config.yaml"),
        "--export-path",
        str(store),
        "--archive-format",
        archive_format,
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize(
    ("archive_format", "archive_name"), [("default", "tiny.mar"), ("tgz", "tiny.tar.gz")]
)
def test_archiver_output_loads_and_serves(
    tmp_path: Path, archive_format: str, archive_name: str
) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    _archive(_sources(tmp_path), store_dir, archive_format)

    store = ModelStore(store_dir, allowed_urls=[])
    info = store.resolve(archive_name)
    assert info.manifest["model"]["handler"] == "handler.py"
    assert info.manifest["model"]["serializedFile"] == "model.pt"
    assert info.model_config == {"batchSize": 2, "handler": {"note": "from the archive"}}

    dest = tmp_path / "work"
    dest.mkdir()
    model_dir = store.extract(info.archive, dest)
    assert (model_dir / "MAR-INF" / "MANIFEST.json").is_file()
    assert (model_dir / "notes.txt").is_file()

    spec = ModelSpec(
        model_name=info.manifest["model"]["modelName"],
        version=info.manifest["model"]["modelVersion"],
        url=archive_name,
        archive=info.archive,
        downloaded=False,
        handler=info.manifest["model"]["handler"],
        batch_size=2,
        manifest=info.manifest,
        model_config=info.model_config,
    )
    loaded = load_handler(model_dir, spec, None)
    assert loaded.context.model_yaml_config["handler"] == {"note": "from the archive"}

    batch = [make_request(f"r{i}", row) for i, row in enumerate(INPUTS)]
    replies = loaded.handle(batch)
    assert [json.loads(reply.body) for reply in replies] == OUTPUTS
    assert [reply.status for reply in replies] == [200, 200]
    assert [m.name for m in loaded.last_metrics] == ["HandlerTime", "PredictionTime"]
