"""The vision built-ins: a clear error without Pillow/torchvision, and the image path.

Pillow and torchvision are not dependencies, so the happy path runs against small
stand-ins for the few calls the handlers make; the model and the top-k are real.
"""

from __future__ import annotations

import base64
import json
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.support.handlers import isolated_imports, make_model_dir, make_request, make_spec
from workers.handling import LoadError, Parameter, load_handler

BUILT_INS = ("ts.torch_handler.vision_handler", "ts.torch_handler.image_classifier")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path) -> Iterator[None]:
    with isolated_imports(tmp_path):
        yield


@pytest.fixture(autouse=True)
def _fresh_built_ins() -> Iterator[None]:
    """Import the vision modules anew in each test, against that test's packages."""
    for name in BUILT_INS:
        sys.modules.pop(name, None)
    yield
    for name in BUILT_INS:
        sys.modules.pop(name, None)


class _Picture:
    def __init__(self, data: bytes) -> None:
        self.level = data[0] / 255


def _stand_ins(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Install minimal ``PIL.Image`` and ``torchvision.transforms`` modules."""
    image = types.ModuleType("PIL.Image")
    image.MAX_IMAGE_PIXELS = 1000  # type: ignore[attr-defined]
    image.open = lambda stream: _Picture(stream.read())  # type: ignore[attr-defined]
    pil = types.ModuleType("PIL")
    pil.Image = image  # type: ignore[attr-defined]

    def step(*args: Any, **kwargs: Any) -> Any:
        return lambda value: value

    class Compose:  # an object, as torchvision's, so it does not bind as a method
        def __init__(self, steps: list[Any]) -> None:
            self.steps = steps

        def __call__(self, value: Any) -> Any:
            for transform in self.steps:
                value = transform(value)
            return value

    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = Compose  # type: ignore[attr-defined]
    transforms.Resize = transforms.CenterCrop = transforms.Normalize = step  # type: ignore[attr-defined]
    transforms.ToTensor = lambda: lambda picture: torch.full((3, 2, 2), picture.level)  # type: ignore[attr-defined]
    vision = types.ModuleType("torchvision")
    vision.transforms = transforms  # type: ignore[attr-defined]
    for name, module in [
        ("PIL", pil),
        ("PIL.Image", image),
        ("torchvision", vision),
        ("torchvision.transforms", transforms),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return image


def _classifier_dir(tmp_path: Path) -> Path:
    """A TorchScript model: class 1 grows with brightness, class 2 shrinks, class 0 is 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(12), torch.ones(12), -torch.ones(12)]))
    mapping = json.dumps({"0": "zero", "1": "one", "2": "two"})
    model_dir = make_model_dir(tmp_path, files={"index_to_name.json": mapping})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates scripting
        torch.jit.script(model).save(str(model_dir / "model.pt"))
    return model_dir


@pytest.mark.parametrize(
    ("missing", "package"),
    [
        (("PIL", "PIL.Image", "torchvision", "torchvision.transforms"), "Pillow"),
        (("torchvision", "torchvision.transforms"), "torchvision"),
    ],
)
def test_missing_packages_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...], package: str
) -> None:
    _stand_ins(monkeypatch)
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # "import name" now fails
    spec = make_spec("image_classifier", model={"serializedFile": "model.pt"})
    with pytest.raises(LoadError) as info:
        load_handler(_classifier_dir(tmp_path), spec, None)
    message = info.value.message
    assert message.startswith("ModuleNotFoundError: The built-in handler")
    assert f"needs the '{package}' package, which is not installed" in message


def test_image_classifier_top_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_ins(monkeypatch)
    spec = make_spec("image_classifier", model={"serializedFile": "model.pt"}, batch_size=2)
    loaded = load_handler(_classifier_dir(tmp_path), spec, None)

    bright = make_request("r0", parameters=[Parameter("data", "image/png", b"\xff")])
    dark = make_request("r1", base64.b64encode(b"\x00").decode(), "text/plain")
    first, second = (json.loads(r.body) for r in loaded.handle([bright, dark]))

    assert list(first) == ["one", "zero", "two"]  # most probable first
    assert first["one"] == pytest.approx(1.0, abs=1e-4)
    assert second == pytest.approx({"zero": 1 / 3, "one": 1 / 3, "two": 1 / 3})


def test_limit_max_image_pixels_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _stand_ins(monkeypatch)
    spec = make_spec("image_classifier", model={"serializedFile": "model.pt"})
    loaded = load_handler(_classifier_dir(tmp_path), spec, None)
    assert image.MAX_IMAGE_PIXELS == 1000  # type: ignore[attr-defined]
    loaded.context.system_properties["limit_max_image_pixels"] = False
    handler = sys.modules["ts.torch_handler.image_classifier"].ImageClassifier()
    handler.initialize(loaded.context)
    assert image.MAX_IMAGE_PIXELS is None  # type: ignore[attr-defined]
    assert handler.get_max_result_classes() == 5


def test_explanations_need_captum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_ins(monkeypatch)
    monkeypatch.setitem(sys.modules, "captum", None)
    spec = make_spec("image_classifier", model={"serializedFile": "model.pt"})
    loaded = load_handler(_classifier_dir(tmp_path), spec, None)
    handler = sys.modules["ts.torch_handler.image_classifier"].ImageClassifier()
    handler.initialize(loaded.context)
    with pytest.raises(ModuleNotFoundError, match="'captum' package"):
        handler.get_insights(torch.zeros(1, 3, 2, 2), None, 0)
