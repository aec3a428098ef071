"""Example handler files for the handling tests, and helpers to lay out model dirs.

The ``*.py`` files here are TorchServe handlers as users write them; tests copy them
into a model directory under ``tmp_path`` and load them from there, never from here.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from control.core.spec import ModelSpec
from workers.handling import InferenceRequest, Parameter

HANDLERS = Path(__file__).resolve().parent


def make_model_dir(
    root: Path,
    *handler_files: str,
    files: dict[str, bytes | str] | None = None,
) -> Path:
    """``root/model`` holding copies of the named handler files plus ``files``."""
    model_dir = root / "model"
    model_dir.mkdir(exist_ok=True)
    for name in handler_files:
        shutil.copy(HANDLERS / name, model_dir / name)
    for name, content in (files or {}).items():
        data = content.encode() if isinstance(content, str) else content
        (model_dir / name).write_bytes(data)
    return model_dir


def make_spec(
    handler: str,
    *,
    name: str = "tiny",
    model: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    batch_size: int = 1,
) -> ModelSpec:
    """A registry spec whose manifest names ``handler`` (plus ``model`` entries)."""
    manifest = {
        "runtime": "python",
        "model": {"modelName": name, "modelVersion": "1.0", "handler": handler, **(model or {})},
        "archiverVersion": "0.12.0",
    }
    return ModelSpec(
        model_name=name,
        version="1.0",
        url=f"{name}.mar",
        archive=f"{name}.mar",
        downloaded=False,
        handler=handler,
        batch_size=batch_size,
        manifest=manifest,
        model_config=model_config or {},
    )


def make_request(
    request_id: str,
    body: Any = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    parameters: list[Parameter] | None = None,
) -> InferenceRequest:
    """A /predictions request: one ``body`` parameter (JSON-encoded unless bytes/str)."""
    if parameters is None:
        if isinstance(body, bytes):
            value = body
        elif isinstance(body, str):
            value = body.encode()
        else:
            value = json.dumps(body).encode()
        parameters = [Parameter("body", content_type, value)]
    all_headers = {"explain": "False", "url_path": ""}
    all_headers.update(headers or {})
    return InferenceRequest(request_id, all_headers, parameters)


@contextmanager
def isolated_imports(root: Path) -> Iterator[None]:
    """Undo ``sys.path`` changes and forget modules imported from under ``root``.

    Handler modules share names across tests (``handler``, ``model``); each test must
    import its own copy. Other new modules (torch internals) stay: re-importing those
    is not safe.
    """
    saved_path = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and Path(file).resolve().is_relative_to(root.resolve()):
                del sys.modules[name]
        importlib.invalidate_caches()
