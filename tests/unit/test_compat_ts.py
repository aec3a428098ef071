"""The ``ts`` compatibility package: where it comes from, and its helpers."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.support.handlers import isolated_imports, make_model_dir, make_request, make_spec
from workers.handling import install_compat_path, load_handler
from workers.handling.compat import COMPAT_DIR


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path) -> Iterator[None]:
    with isolated_imports(tmp_path):
        yield


@pytest.fixture
def no_ts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process where nothing named ``ts`` was imported or put on ``sys.path`` yet."""
    for name in [n for n in sys.modules if n == "ts" or n.startswith("ts.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(COMPAT_DIR)])
    # An installed mqserve also provides ``ts`` through its startup finder
    # (workers/compat/startup): take that away too.
    finders = [f for f in sys.meta_path if type(f).__name__ != "TsFallbackFinder"]
    monkeypatch.setattr(sys, "meta_path", finders)
    importlib.invalidate_caches()


@pytest.fixture
def util() -> ModuleType:
    install_compat_path()
    return importlib.import_module("ts.utils.util")


@pytest.mark.usefixtures("no_ts")
def test_compat_dir_is_appended_when_no_ts_exists() -> None:
    assert install_compat_path() is True
    assert sys.path[-1] == str(COMPAT_DIR)
    assert install_compat_path() is False  # idempotent
    assert sys.path.count(str(COMPAT_DIR)) == 1
    ts = importlib.import_module("ts")
    assert Path(ts.__file__ or "").parent == COMPAT_DIR / "ts"
    assert ts.__version__ == "0.12.0"


@pytest.mark.usefixtures("no_ts")
def test_a_real_ts_is_never_shadowed(tmp_path: Path) -> None:
    real = tmp_path / "site" / "ts"
    (real / "torch_handler").mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    (real / "torch_handler" / "__init__.py").write_text("")
    (real / "torch_handler" / "base_handler.py").write_text(
        "def handle(data, context):\n    return None if data is None else ['real ts']\n"
    )
    sys.path.insert(0, str(tmp_path / "site"))

    assert install_compat_path() is False
    assert str(COMPAT_DIR) not in sys.path
    assert importlib.import_module("ts").REAL is True

    # The built-in fallback then resolves inside the real installation.
    loaded = load_handler(make_model_dir(tmp_path), make_spec("base_handler"), None)
    assert loaded.handle([make_request("r1", {})])[0].body == b"real ts"
    assert str(COMPAT_DIR) not in sys.path


def test_ts_reexports() -> None:
    install_compat_path()
    from workers.handling import Context, RequestProcessor
    from workers.handling.metrics import Dimension, MetricTypes

    assert importlib.import_module("ts.context").Context is Context
    assert importlib.import_module("ts.context").RequestProcessor is RequestProcessor
    assert importlib.import_module("ts.metrics.dimension").Dimension is Dimension
    assert importlib.import_module("ts.metrics.metric_type_enum").MetricTypes is MetricTypes


def test_streaming_helper_imports_where_torchserve_handlers_import_it() -> None:
    install_compat_path()
    from workers.handling.streaming import send_intermediate_predict_response

    for module in ("ts.handler_utils.utils", "ts.protocol.otf_message_handler"):
        helper = importlib.import_module(module).send_intermediate_predict_response
        assert helper is send_intermediate_predict_response


def test_prediction_exception(util: ModuleType) -> None:
    exc = util.PredictionException("bad input", 400)
    assert (exc.message, exc.error_code, str(exc)) == ("bad input", 400, "bad input : 400")
    assert util.PredictionException("x").error_code == 500


def test_load_label_mapping(util: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "index_to_name.json"
    assert util.load_label_mapping(str(path)) is None
    path.write_text(json.dumps({"0": "cat", "1": ["n02", "dog"]}))
    assert util.load_label_mapping(str(path)) == {"0": "cat", "1": "dog"}
    path.write_text(json.dumps({"object_type_names": ["a", "b"]}))
    assert util.load_label_mapping(str(path)) == {"0": "a", "1": "b"}
    for bad in (["a"], {"0": 1}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            util.load_label_mapping(str(path))


def test_map_class_to_label(util: ModuleType) -> None:
    probs = [[0.9, 0.1], [0.2, 0.8]]
    assert util.map_class_to_label(probs) == [{"0": 0.9, "1": 0.1}, {"0": 0.2, "1": 0.8}]
    mapped = util.map_class_to_label([[0.7]], {"3": "dog"}, [[3]])
    assert mapped == [{"dog": 0.7}]
    with pytest.raises(TypeError):
        util.map_class_to_label("not a list")


def test_get_yaml_config_is_safe(util: ModuleType, tmp_path: Path) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text("minWorkers: 1\nhandler:\n  k: v\n")
    assert util.get_yaml_config(str(config)) == {"minWorkers": 1, "handler": {"k": "v"}}
    marker = tmp_path / "executed"
    config.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(yaml.YAMLError):
        util.get_yaml_config(str(config))
    assert not marker.exists()


def test_list_classes_from_module(util: ModuleType, tmp_path: Path) -> None:
    source = (
        "import json\nfrom pathlib import Path\n\nclass A:\n    pass\n\nclass B(A):\n    pass\n"
    )
    model_dir = make_model_dir(tmp_path, files={"classes_mod.py": source})
    sys.path.insert(0, str(model_dir))
    module = importlib.import_module("classes_mod")
    assert [c.__name__ for c in util.list_classes_from_module(module)] == ["A", "B"]
    assert [c.__name__ for c in util.list_classes_from_module(module, module.B)] == ["B"]
