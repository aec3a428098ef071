"""Handler resolution and load failures (docs/torchserve-compat.md#handler-resolution)."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch  # noqa: F401 - imported once here, not first inside a handler under test

from tests.support.handlers import isolated_imports, make_model_dir, make_request, make_spec
from workers.handling import LoadError, enter_model_dir, load_handler
from workers.handling.loader import MAX_MESSAGE, parse_handler

HANDLERS = Path(__file__).resolve().parents[1] / "support" / "handlers"


def line_of(path: Path, text: str) -> int:
    """The 1-based number of the first line of ``path`` that contains ``text``."""
    lines = path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path) -> Iterator[None]:
    with isolated_imports(tmp_path):
        yield


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        ("handler", ("handler", "handle")),
        ("handler.py", ("handler", "handle")),
        ("a/b/c.py", ("c", "handle")),
        ("my_handler.py:my_fn", ("my_handler", "my_fn")),
        ("my_handler:fn:extra", ("my_handler", "fn:extra")),
        ("base_handler", ("base_handler", "handle")),
    ],
)
def test_parse_handler(handler: str, expected: tuple[str, str]) -> None:
    assert parse_handler(handler) == expected


def test_function_entry_point_is_initialised_with_none(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "function_handler.py")
    loaded = load_handler(model_dir, make_spec("function_handler.py"), None)

    calls = sys.modules["function_handler"].calls
    assert len(calls) == 1
    data, context = calls[0]
    assert data is None
    assert context is loaded.context
    replies = loaded.handle([make_request("r1", {"x": 1})])
    assert replies[0].body == b'{\n  "x": 1\n}'


def test_module_function_entry_point(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "function_handler.py")
    loaded = load_handler(model_dir, make_spec("function_handler.py:shout"), None)

    assert [m.name for m in loaded.load_metrics] == ["ShoutInitialized"]
    replies = loaded.handle([make_request("r1", "hi", "text/plain")])
    assert replies[0].body == b"HI"


def test_handler_path_with_directories(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "function_handler.py")
    loaded = load_handler(model_dir, make_spec("some/dir/function_handler.py"), None)
    assert loaded.handle([make_request("r1", "x", "text/plain")])[0].body == b"x"


def test_single_class_is_instantiated_and_initialised(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "class_handler.py")
    loaded = load_handler(model_dir, make_spec("class_handler.py"), None)

    service = loaded.entry_point.__self__  # type: ignore[attr-defined]
    assert isinstance(service, sys.modules["class_handler"].EchoService)
    assert service.initialized
    assert service.context is loaded.context
    reply = loaded.handle([make_request("r1", {})])[0]
    assert json.loads(reply.body)["id"] == "r1"


def test_class_without_initialize_needs_none(tmp_path: Path) -> None:
    source = "class Plain:\n    def handle(self, data, context):\n        return ['plain']\n"
    model_dir = make_model_dir(tmp_path, files={"plain.py": source})
    loaded = load_handler(model_dir, make_spec("plain.py"), None)
    assert loaded.handle([make_request("r1", {})])[0].body == b"plain"


def test_two_classes_are_refused(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "two_classes.py")
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("two_classes.py"), None)
    assert info.value.message.startswith(
        "ValueError: Expected only one class in custom service code or a function entry point"
    )
    assert "First, Second" in info.value.message
    assert not info.value.oom


def test_class_without_handle_is_refused(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, files={"nohandle.py": "class Only:\n    pass\n"})
    with pytest.raises(LoadError, match="Expect handle method in class Only"):
        load_handler(model_dir, make_spec("nohandle.py"), None)


def test_builtin_base_handler_is_the_fallback(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path)
    # No serializedFile: the built-in BaseHandler itself was imported and initialised.
    with pytest.raises(LoadError, match="RuntimeError: No model weights could be loaded"):
        load_handler(model_dir, make_spec("base_handler"), None)
    assert "ts.torch_handler.base_handler" in sys.modules


def test_handler_file_in_model_dir_wins_over_builtin_name(tmp_path: Path) -> None:
    handler = "def handle(data, context):\n    return None if data is None else ['local']\n"
    model_dir = make_model_dir(tmp_path, files={"base_handler.py": handler})
    loaded = load_handler(model_dir, make_spec("base_handler"), None)
    assert loaded.handle([make_request("r1", {})])[0].body == b"local"


def test_missing_module_names_the_handler(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path)
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("invalidHandler"), None)
    assert info.value.message == "ModuleNotFoundError: No module named 'invalidHandler'"
    assert not info.value.oom


def test_import_error_inside_handler_is_not_a_fallback(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "broken_import.py")
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("broken_import.py"), None)
    line = line_of(HANDLERS / "broken_import.py", "import mqserve_test_missing_dependency")
    assert info.value.message == (
        "ModuleNotFoundError: No module named 'mqserve_test_missing_dependency' "
        f"(broken_import.py, line {line})"
    )


def test_syntax_error_in_handler_is_reported(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, files={"bad.py": "def handle(:\n"})
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("bad.py"), None)
    message = info.value.message
    assert message.startswith("SyntaxError: ")
    assert message.endswith(" (bad.py, line 1)")
    assert message.count("bad.py") == 1  # not SyntaxError's own "(file, line)" as well
    assert str(tmp_path) not in message


@pytest.mark.parametrize(
    ("fail", "cause"),
    [
        ("memory", "MemoryError"),
        ("cuda", "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)
def test_out_of_memory_at_load(tmp_path: Path, fail: str, cause: str) -> None:
    model_dir = make_model_dir(tmp_path, "init_failure_handler.py")
    spec = make_spec("init_failure_handler.py", model_config={"fail": fail})
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, spec, None)
    assert info.value.oom
    line = line_of(HANDLERS / "init_failure_handler.py", cause.partition(":")[0] + "(")
    assert info.value.message == (
        f"System out of memory: {cause} (init_failure_handler.py, line {line})"
    )


def test_load_error_names_the_cause_without_paths(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "init_failure_handler.py")
    spec = make_spec("init_failure_handler.py", model_config={"fail": "file"})
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, spec, None)
    message = info.value.message
    line = line_of(HANDLERS / "init_failure_handler.py", "missing.bin")
    assert message == (
        "FileNotFoundError: [Errno 2] No such file or directory: 'missing.bin' "
        f"(init_failure_handler.py, line {line})"
    )
    assert not info.value.oom


def test_model_dir_is_prepended_to_sys_path_and_cwd_left_alone(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "function_handler.py")
    cwd = Path.cwd()
    load_handler(model_dir, make_spec("function_handler.py"), None)
    assert sys.path[0] == str(model_dir.resolve())
    assert Path.cwd() == cwd


def test_enter_model_dir_changes_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # restored after the test
    model_dir = make_model_dir(tmp_path)
    enter_model_dir(model_dir)
    assert Path.cwd() == model_dir.resolve()


def test_context_at_load(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, "function_handler.py")
    spec = make_spec(
        "function_handler.py",
        name="cfg",
        batch_size=4,
        model_config={"handler": {"threshold": 0.5}, "minWorkers": 1},
    )
    loaded = load_handler(model_dir, spec, 3)
    context = loaded.context
    assert context.model_name == "cfg"
    assert context.manifest == spec.manifest
    assert context.model_yaml_config == {"handler": {"threshold": 0.5}, "minWorkers": 1}
    assert context.system_properties == {
        "model_dir": str(model_dir.resolve()),
        "gpu_id": 3,
        "batch_size": 4,
        "server_name": "MMS",
        "server_version": "0.12.0",
        "limit_max_image_pixels": True,
    }
    assert context.request_ids is None
    assert context.cl_socket is None
    assert context.stopping_criteria is None


# -- lastError: type, message, and where the archive's code raised it ---------------

INIT_RAISES = """\
class ModelHandler:
    def initialize(self, context):
        self.ready = False
        raise ValueError("bad weights")

    def handle(self, data, context):
        return data
"""


def test_exception_in_initialize_names_type_message_file_and_line(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, files={"model_handler.py": INIT_RAISES})
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("model_handler.py"), None)
    assert info.value.message == "ValueError: bad weights (model_handler.py, line 4)"
    assert not info.value.oom


def test_cause_carries_the_whole_traceback(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, files={"model_handler.py": INIT_RAISES})
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("model_handler.py"), None)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    text = "".join(traceback.format_exception(cause))
    assert text.startswith("Traceback (most recent call last):")
    handler = (model_dir / "model_handler.py").resolve()
    assert f'File "{handler}", line 4, in initialize' in text
    assert text.rstrip().endswith("ValueError: bad weights")


def test_location_is_the_innermost_frame_in_the_archive(tmp_path: Path) -> None:
    helper = "def load_weights(path):\n    raise OSError(f'cannot read {path}')\n"
    handler = (
        "from handler_lib.weights import load_weights\n"
        "\n"
        "def handle(data, context):\n"
        "    if data is None:\n"
        "        load_weights('/srv/secret/model.bin')\n"
    )
    model_dir = make_model_dir(tmp_path, files={"handler.py": handler})
    (model_dir / "handler_lib").mkdir()
    (model_dir / "handler_lib" / "__init__.py").write_text("")
    (model_dir / "handler_lib" / "weights.py").write_text(helper)
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("handler.py"), None)
    assert info.value.message == ("OSError: cannot read model.bin (handler_lib/weights.py, line 2)")


def test_library_errors_point_at_the_handler_line_that_called(tmp_path: Path) -> None:
    handler = "import json\n\ndef handle(data, context):\n    json.loads('{')\n"
    model_dir = make_model_dir(tmp_path, files={"handler.py": handler})
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("handler.py"), None)
    message = info.value.message
    assert message.startswith("JSONDecodeError: Expecting property name enclosed")
    assert message.endswith(" (handler.py, line 4)")  # not json/decoder.py's frame


def test_no_location_when_no_archive_code_ran(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path)
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("base_handler"), None)
    assert info.value.message == "RuntimeError: No model weights could be loaded"


def test_long_multiline_message_is_one_bounded_line_that_keeps_the_location(
    tmp_path: Path,
) -> None:
    handler = "def handle(data, context):\n    raise ValueError('line\\n' * 2000)\n"
    model_dir = make_model_dir(tmp_path, files={"handler.py": handler})
    with pytest.raises(LoadError) as info:
        load_handler(model_dir, make_spec("handler.py"), None)
    message = info.value.message
    assert len(message) == MAX_MESSAGE
    assert "\n" not in message
    assert message.startswith("ValueError: line line line")
    assert message.endswith("... (handler.py, line 2)")
