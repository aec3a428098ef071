"""The compatibility BaseHandler: model formats, safe loading, handle() paths
(docs/torchserve-compat.md#basehandler)."""

from __future__ import annotations

import builtins
import importlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.support.handlers import isolated_imports, make_model_dir, make_request, make_spec
from workers.handling import (
    Context,
    HandlerFailure,
    LoadedModel,
    LoadError,
    install_compat_path,
    load_handler,
)

INPUTS = [[1.0, 2.0], [0.0, 1.0]]
#: INPUTS through weight [[1, 2], [3, 4]] and bias [0.5, -0.5].
OUTPUTS = [[5.5, 10.5], [2.5, 3.5]]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path) -> Iterator[None]:
    with isolated_imports(tmp_path):
        yield


@pytest.fixture
def base_handler() -> ModuleType:
    install_compat_path()
    return importlib.import_module("ts.torch_handler.base_handler")


def _linear() -> nn.Linear:
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    return layer


def _state_dict() -> dict[str, torch.Tensor]:
    return {f"linear.{k}": v for k, v in _linear().state_dict().items()}


def _torchscript_dir(tmp_path: Path, *files: str, **extra: bytes | str) -> Path:
    model_dir = make_model_dir(tmp_path, *files, files=dict(extra))
    with warnings.catch_warnings():
        # torch 2.13 deprecates scripting; TorchScript archives must still load.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(_linear())
    scripted.save(str(model_dir / "model.pt"))
    return model_dir


def _load_tensor_handler(
    model_dir: Path, model: dict[str, Any], config: dict[str, Any] | None = None
) -> LoadedModel:
    spec = make_spec("tensor_handler.py", model=model, model_config=config, batch_size=2)
    return load_handler(model_dir, spec, None)


def _predict(loaded: LoadedModel, **headers: str) -> list[Any]:
    batch = [make_request(f"r{i}", row, headers=headers) for i, row in enumerate(INPUTS)]
    return [json.loads(reply.body) for reply in loaded.handle(batch)]


def test_torchscript_model(tmp_path: Path) -> None:
    model_dir = _torchscript_dir(tmp_path, "tensor_handler.py")
    loaded = _load_tensor_handler(model_dir, {"serializedFile": "model.pt"})
    assert _predict(loaded) == OUTPUTS
    assert [m.name for m in loaded.last_metrics] == ["HandlerTime", "PredictionTime"]


def test_eager_model_with_state_dict(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "tensor_handler.py", "tiny_model.py")
    torch.save(_state_dict(), model_dir / "model.pth")
    model = {"serializedFile": "model.pth", "modelFile": "tiny_model.py"}
    assert _predict(_load_tensor_handler(model_dir, model)) == OUTPUTS


def test_eager_model_with_safetensors(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "tensor_handler.py", "tiny_model.py")
    save_file(_state_dict(), str(model_dir / "model.safetensors"))
    model = {"serializedFile": "model.safetensors", "modelFile": "tiny_model.py"}
    assert _predict(_load_tensor_handler(model_dir, model)) == OUTPUTS


class _Malicious:
    """Unpickling this opens (creates) ``path``: any side effect would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.path), "w"))


def test_checkpoint_that_needs_unpickling_is_refused(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "tensor_handler.py", "tiny_model.py")
    marker = tmp_path / "pwned"
    torch.save({"linear.weight": _Malicious(marker)}, model_dir / "model.pth")
    model = {"serializedFile": "model.pth", "modelFile": "tiny_model.py"}

    with pytest.raises(LoadError) as info:
        _load_tensor_handler(model_dir, model)

    assert not marker.exists()
    assert info.value.message.startswith(
        "RuntimeError: model.pth needs full unpickling, which is refused"
    )
    assert "io.open" in info.value.message
    assert str(tmp_path) not in info.value.message
    # The fixture really is malicious: a full unpickle runs it.
    torch.load(model_dir / "model.pth", weights_only=False)["linear.weight"].close()
    assert marker.exists()


def test_pt_file_that_is_not_torchscript_is_refused(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "tensor_handler.py")
    torch.save(_state_dict(), model_dir / "model.pt")
    with pytest.raises(LoadError, match=r"RuntimeError: model\.pt is not a TorchScript archive"):
        _load_tensor_handler(model_dir, {"serializedFile": "model.pt"})


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({}, "RuntimeError: No model weights could be loaded"),
        ({"serializedFile": "model.onnx"}, "RuntimeError: No model weights could be loaded"),
        ({"modelFile": "absent.py"}, "RuntimeError: Missing the model.py file"),
        ({"modelFile": "two_models.py"}, "ValueError: Expected only one class as model"),
    ],
)
def test_unloadable_models(tmp_path: Path, model: dict[str, Any], message: str) -> None:
    two = "from torch import nn\n\nclass A(nn.Module):\n    pass\n\nclass B(nn.Module):\n    pass\n"
    model_dir = make_model_dir(tmp_path, "tensor_handler.py", files={"two_models.py": two})
    with pytest.raises(LoadError) as info:
        _load_tensor_handler(model_dir, model)
    assert info.value.message.startswith(message)


def test_index_to_name_mapping(tmp_path: Path) -> None:
    mapping = json.dumps({"0": "cat", "1": ["n02", "dog"]})
    model_dir = _torchscript_dir(tmp_path, "tensor_handler.py", **{"index_to_name.json": mapping})
    loaded = _load_tensor_handler(model_dir, {"serializedFile": "model.pt"})
    assert _predict(loaded) == [{"dog": OUTPUTS[0]}, {"dog": OUTPUTS[1]}]


def test_describe_and_explain(tmp_path: Path) -> None:
    model_dir = _torchscript_dir(tmp_path, "tensor_handler.py")
    loaded = _load_tensor_handler(model_dir, {"serializedFile": "model.pt"})

    describe = make_request("d", parameters=[], headers={"describe": "True"})
    body = json.loads(loaded.handle([describe])[0].body)
    assert body == {"handler": "TensorHandler", "device": "cpu"}

    explained = _predict(loaded, explain="True")
    assert explained == [{"target": 0, "inputs": INPUTS[0]}] * 2


def test_profile_config_times_each_step(tmp_path: Path) -> None:
    model_dir = _torchscript_dir(tmp_path, "tensor_handler.py")
    config = {"handler": {"profile": True}}
    loaded = _load_tensor_handler(model_dir, {"serializedFile": "model.pt"}, config)
    _predict(loaded)
    # TensorHandler overrides preprocess and postprocess without @timed.
    names = [m.name for m in loaded.last_metrics]
    assert names == ["ts_handler_inference", "HandlerTime", "PredictionTime"]


def test_plain_base_handler_defaults(tmp_path: Path, base_handler: ModuleType) -> None:
    model_dir = _torchscript_dir(tmp_path)
    manifest = {"model": {"serializedFile": "model.pt"}}
    context = Context("m", str(model_dir), manifest, 2, None, "0.12.0")
    handler = base_handler.BaseHandler()
    handler.initialize(context)
    assert handler.initialized
    assert handler.mapping is None
    assert handler.get_device() == torch.device("cpu")
    assert handler.describe_handle() is None
    assert handler.handle(INPUTS, context) == OUTPUTS
    assert [r.name for r in context.metrics.drain()] == ["HandlerTime"]
    with pytest.raises(NotImplementedError):
        handler.explain_handle(torch.zeros(1), [{"data": 1}])


def test_built_in_base_handler_by_name(tmp_path: Path) -> None:
    model_dir = _torchscript_dir(tmp_path)
    spec = make_spec("base_handler", model={"serializedFile": "model.pt"})
    loaded = load_handler(model_dir, spec, None)
    # Upstream's default preprocess cannot tensorise request dicts: a 503, as upstream.
    with pytest.raises(HandlerFailure) as info:
        loaded.handle([make_request("r1", INPUTS[0])])
    assert (info.value.status, info.value.message) == (503, "Prediction failed")


def test_device_selection(base_handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert base_handler.select_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert base_handler.select_device(None) == torch.device("cpu")
    assert base_handler.select_device(1) == torch.device("cuda:1")
