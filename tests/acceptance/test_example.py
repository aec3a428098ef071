"""``examples/iris`` as a user runs it: ``train.py`` trains and packages ``iris.mar``.

These tests need the ``examples`` extra (scikit-learn, torch-model-archiver). Without it
they fail, not skip: CI installs it, and a skipped example is an untested example.
The handler tests need the ``ts`` package (mqserve's compatibility layer in
``workers/compat``, or TorchServe itself) and are skipped until it is importable.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from workers.handling.compat import install_compat_path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "iris"
LABELS = {"0": "setosa", "1": "versicolor", "2": "virginica"}
SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]


def require_examples_extra() -> None:
    """Fail (not skip) with the fix when the ``examples`` extra is not installed."""
    missing = []
    if importlib.util.find_spec("sklearn") is None:
        missing.append("scikit-learn")
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    if not archiver.exists() and shutil.which("torch-model-archiver") is None:
        missing.append("torch-model-archiver")
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed: the examples extra is required "
            "(.venv/bin/pip install -e '.[examples]')",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``(export dir, stdout)`` of one ``train.py --export-path`` run."""
    require_examples_extra()
    export = tmp_path_factory.mktemp("export")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), "--export-path", str(export)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path_factory.mktemp("cwd"),  # a user's working directory, not the repo
    )
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout}\n{proc.stderr}"
    return export, proc.stdout


@pytest.fixture(scope="module")
def model_dir(trained: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``iris.mar`` extracted, as a server does before loading it."""
    target = tmp_path_factory.mktemp("model")
    with zipfile.ZipFile(trained[0] / "iris.mar") as mar:
        mar.extractall(target)
    return target


def test_train_prints_accuracy_above_0_9(trained: tuple[Path, str]) -> None:
    match = re.search(r"held-out accuracy: ([0-9.]+) \((\d+)/(\d+)\)", trained[1])
    assert match, f"no accuracy line in:\n{trained[1]}"
    assert float(match.group(1)) > 0.9
    assert int(match.group(3)) >= 30  # evaluated on a real held-out set


def test_train_writes_only_a_torchserve_archive(trained: tuple[Path, str]) -> None:
    export, _ = trained
    assert [path.name for path in export.iterdir()] == ["iris.mar"]
    mar_path = export / "iris.mar"
    assert zipfile.is_zipfile(mar_path)
    with zipfile.ZipFile(mar_path) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        mapping = json.loads(mar.read("index_to_name.json"))
    assert {"iris.pt", "iris_handler.py", "index_to_name.json"} <= names
    assert manifest["runtime"] == "python"
    assert manifest["archiverVersion"] == "0.12.0"  # written by the real archiver
    model = manifest["model"]
    assert model["modelName"] == "iris"
    assert model["modelVersion"] == "1.0"
    assert model["handler"] == "iris_handler.py"
    assert model["serializedFile"] == "iris.pt"
    assert "modelFile" not in model  # TorchScript: BaseHandler needs no model definition
    assert mapping == LABELS


# -- the handler, with the ts package -----------------------------------------------------


@pytest.fixture(scope="module")
def handler_module() -> Iterator[ModuleType]:
    """``iris_handler`` imported as a server imports it, with ``ts`` on the path."""
    install_compat_path()
    importlib.import_module("ts.torch_handler.base_handler")  # what the handler imports
    spec = importlib.util.spec_from_file_location("iris_handler", EXAMPLE / "iris_handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


def make_handler(module: ModuleType) -> Any:
    handler = module.IrisHandler()
    handler.mapping = dict(LABELS)
    return handler


@pytest.mark.parametrize(
    "request_row",
    [
        {"body": SETOSA},
        {"data": SETOSA},
        {"body": {"features": SETOSA}},
        {"body": "5.1,3.5,1.4,0.2"},
        {"body": " 5.1, 3.5, 1.4, 0.2\n"},
        {"body": b"5.1,3.5,1.4,0.2"},
        {"body": bytearray(b"[5.1, 3.5, 1.4, 0.2]")},
        {"data": bytearray(b'{"features": [5.1, 3.5, 1.4, 0.2]}')},
    ],
)
def test_preprocess_accepts_every_documented_form(
    handler_module: ModuleType, request_row: dict[str, Any]
) -> None:
    tensor = make_handler(handler_module).preprocess([request_row])
    assert tensor.dtype == torch.float32
    assert tensor.tolist() == [pytest.approx(SETOSA)]


def test_preprocess_keeps_one_row_per_request(handler_module: ModuleType) -> None:
    tensor = make_handler(handler_module).preprocess([{"body": SETOSA}, {"data": VIRGINICA}])
    assert tensor.shape == (2, 4)


@pytest.mark.parametrize(
    "body",
    [[1, 2, 3], [1, 2, 3, 4, 5], {"x": SETOSA}, "a,b,c,d", [1, 2, 3, True], "nan,1,2,3",
     b"\xff\xfe", "[1, 2", None],
)  # fmt: skip
def test_preprocess_refuses_malformed_input_with_400(handler_module: ModuleType, body: Any) -> None:
    from ts.utils.util import PredictionException

    with pytest.raises(PredictionException) as exc:
        make_handler(handler_module).preprocess([{"body": SETOSA}, {"body": body}])
    assert exc.value.error_code == 400
    assert exc.value.message.startswith("request 1: ")


def test_postprocess_returns_top3_labels_most_likely_first(handler_module: ModuleType) -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 5.0]])
    out = make_handler(handler_module).postprocess(logits)
    assert [list(row) for row in out] == [
        ["versicolor", "setosa", "virginica"],
        ["virginica", "setosa", "versicolor"],
    ]
    for row in out:
        probabilities = list(row.values())
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0)
        assert all(isinstance(p, float) for p in probabilities)
    json.dumps(out)  # what the server serialises


def test_postprocess_without_mapping_uses_indices(handler_module: ModuleType) -> None:
    handler = make_handler(handler_module)
    handler.mapping = None
    assert list(handler.postprocess(torch.tensor([[0.0, 1.0, 2.0]]))[0]) == ["2", "1", "0"]


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*:DeprecationWarning")
def test_trained_model_classifies_through_the_handler(
    handler_module: ModuleType, model_dir: Path
) -> None:
    handler = make_handler(handler_module)
    model = torch.jit.load(str(model_dir / "iris.pt"), map_location="cpu")
    batch = [{"body": SETOSA}, {"body": {"features": VIRGINICA}}, {"body": "5.9,3.0,4.2,1.5"}]
    with torch.inference_mode():
        out = handler.postprocess(model(handler.preprocess(batch)))
    assert [next(iter(row)) for row in out] == ["setosa", "virginica", "versicolor"]
