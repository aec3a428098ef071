"""Load a model's handler the way TorchServe's ``ts/model_loader.py`` does
(``docs/torchserve-compat.md#handler-resolution``).

1. The model directory is prepended to ``sys.path``. (TorchServe also makes it the
   worker's cwd; that is :func:`enter_model_dir`, which the worker process calls
   before :func:`load_handler`. It is kept apart because the cwd is process-wide.)
2. The handler string is split at the first ``:`` into a module and a function name
   (default ``handle``); a ``.py`` suffix and any directories are dropped.
3. The module is imported; only if *that* module does not exist is the built-in
   ``ts.torch_handler.<module>`` tried. An import error raised while running the
   module (a missing dependency, a syntax error) is reported as it is.
4. A module with the function is a function entry point: ``fn(None, context)`` at
   load, ``fn(data, context)`` per batch. Otherwise it must define exactly one class,
   which is instantiated without arguments and must have ``handle``; its
   ``initialize(context)`` runs at load.

Every failure is a :class:`LoadError` whose message is one bounded line for
describe's ``lastError``: the exception's type and message, without filesystem paths,
and where the archive's code raised it, e.g. ``ValueError: bad weights
(model_handler.py, line 12)`` (:func:`summarize`). The exception itself is the
error's ``__cause__``, so its whole traceback can be logged (the worker does).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from control.archives.unpack import is_within
from control.core.metrics_schema import MetricsConfig
from control.core.spec import ModelSpec
from workers.handling.compat import install_compat_path
from workers.handling.context import Context
from workers.handling.metrics import HandlerMetrics
from workers.handling.service import EntryPoint, LoadedModel

#: The TorchServe release whose backend behaviour this layer follows.
TORCHSERVE_VERSION = "0.12.0"
BUILTIN_PACKAGE = "ts.torch_handler"
OUT_OF_MEMORY = "System out of memory"
#: Longest :class:`LoadError` message: it is stored in a Redis hash field (the worker's
#: ``reason``) and shown in describe, so it stays a short line whatever the handler raised.
MAX_MESSAGE = 1000
#: Longest file name in a message's location; longer ones keep their end.
MAX_LOCATION = 200

Initializer = Callable[[Context], object]

# An absolute path's directories ("/a/b/" of "/a/b/c.py"), not preceded by a name char.
_DIRECTORIES = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"]+/)+")


class LoadError(Exception):
    """The handler could not be loaded; ``oom`` marks an out-of-memory failure (507).

    ``message`` is one line of at most :data:`MAX_MESSAGE` characters.
    """

    def __init__(self, message: str, oom: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.oom = oom


def enter_model_dir(model_dir: Path) -> None:
    """Make ``model_dir`` the process's cwd, as TorchServe starts its workers.

    Handlers open files by relative names, so the worker calls this once, before
    :func:`load_handler`. Never call it in a process that serves several models.
    """
    os.chdir(model_dir)


def load_handler(
    model_dir: Path,
    spec: ModelSpec,
    gpu_id: int | None,
    metrics_config: MetricsConfig | None = None,
) -> LoadedModel:
    """Import and initialise ``spec.handler`` from the unpacked archive ``model_dir``.

    The context gets ``spec.manifest`` (None when empty), ``spec.model_config`` as
    ``model_yaml_config``, and a metrics cache with the ``model_metrics`` of
    ``metrics_config`` declared (None: the default metrics.yaml's). Raises
    :class:`LoadError`.
    """
    install_compat_path()
    directory = str(model_dir.resolve())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    context = Context(
        spec.model_name,
        directory,
        spec.manifest or None,
        spec.batch_size,
        gpu_id,
        TORCHSERVE_VERSION,
        True,
        HandlerMetrics(spec.model_name, metrics_config),
        dict(spec.model_config),
    )
    try:
        entry_point, initialize = resolve_handler(spec.handler)
        initialize(context)
    except Exception as exc:  # handler code is user code: anything may come out
        raise load_error(exc, model_dir) from exc
    return LoadedModel(context, entry_point)


def parse_handler(handler: str) -> tuple[str, str]:
    """``(module name, function name)`` of a manifest handler string."""
    module, _, function = handler.partition(":")
    module = module.removesuffix(".py")
    module = re.split(r"[/\\]", module)[-1]
    if not module:
        raise ValueError(f"Invalid handler: {handler!r}")
    return module, function or "handle"


def resolve_handler(handler: str) -> tuple[EntryPoint, Initializer]:
    """The per-batch entry point and the load-time initializer of ``handler``."""
    module_name, function_name = parse_handler(handler)
    module = import_handler_module(module_name)
    function = getattr(module, function_name, None)
    if function is not None:
        if not callable(function):
            raise ValueError(f"{function_name} in the handler module is not callable")
        return function, lambda context: function(None, context)
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        names = ", ".join(cls.__name__ for cls in classes) or "none"
        raise ValueError(
            "Expected only one class in custom service code or a function entry point "
            f"(found: {names})"
        )
    service = classes[0]()
    if not callable(getattr(service, "handle", None)):
        raise ValueError(f"Expect handle method in class {classes[0].__name__}")
    initialize = getattr(service, "initialize", None)
    return service.handle, initialize if callable(initialize) else _no_initialize


def import_handler_module(name: str) -> ModuleType:
    """Import handler module ``name``, or the built-in ``ts.torch_handler.<name>``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not _names(exc, name):
            raise
    builtin = f"{BUILTIN_PACKAGE}.{name}"
    try:
        return importlib.import_module(builtin)
    except ModuleNotFoundError as exc:
        if not _names(exc, builtin):
            raise
    raise ModuleNotFoundError(f"No module named '{name}'", name=name)


def list_classes_from_module(module: ModuleType, parent_class: type | None = None) -> list[type]:
    """Classes defined in ``module`` itself (not imported into it), in name order.

    With ``parent_class``, only its subclasses. (``ts.utils.util`` exports this too.)
    """
    classes = [
        member
        for _, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module.__name__
    ]
    if parent_class is not None:
        return [cls for cls in classes if issubclass(cls, parent_class)]
    return classes


def load_error(exc: BaseException, model_dir: Path | None = None) -> LoadError:
    """The :class:`LoadError` for a failure while importing or initialising a handler.

    Out of memory (``MemoryError``, or a RuntimeError naming CUDA) is TorchServe's
    ``System out of memory``, followed by the summary: ``System out of memory:
    MemoryError (handler.py, line 9)``.
    """
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "CUDA" in str(exc)):
        return LoadError(summarize(exc, model_dir, prefix=f"{OUT_OF_MEMORY}: "), oom=True)
    return LoadError(summarize(exc, model_dir))


def summarize(exc: BaseException, model_dir: Path | None, prefix: str = "") -> str:
    """``prefix`` + ``Type: message (file, line N)`` on one line of at most MAX_MESSAGE chars.

    The location is :func:`handler_location` (left out when there is none). The message
    has its absolute paths cut to their last component and every run of whitespace, line
    breaks included, made one space; when too long, the message is shortened, never the
    type or the location.
    """
    message = exc.msg if isinstance(exc, SyntaxError) else str(exc)  # no "(file, line)" twice
    text = type(exc).__name__ + (f": {message}" if message else "")
    text = prefix + " ".join(_DIRECTORIES.sub("", text).split())
    where = handler_location(exc, model_dir) if model_dir is not None else None
    if where is None:
        return _bounded(text, MAX_MESSAGE)
    name, line = where
    if len(name) > MAX_LOCATION:
        name = "..." + name[3 - MAX_LOCATION :]
    suffix = f" ({name}, line {line})"
    return _bounded(text, MAX_MESSAGE - len(suffix)) + suffix


def handler_location(exc: BaseException, model_dir: Path) -> tuple[str, int] | None:
    """Where the archive's own code raised ``exc``: ``(file relative to model_dir, line)``.

    That is the innermost traceback frame in a file under ``model_dir`` (the handler,
    or a module of the archive it imports), or for a ``SyntaxError`` in such a file the
    offending line. None when no archive code ran (the handler module is missing, or a
    built-in handler failed by itself).
    """
    root = str(model_dir)
    syntax = exc if isinstance(exc, SyntaxError) else None
    if syntax and syntax.filename and syntax.lineno and _inside(root, syntax.filename):
        return _relative(root, syntax.filename), syntax.lineno
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _inside(root, frame.filename):
            return _relative(root, frame.filename), frame.lineno or 0
    return None


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _inside(root: str, path: str) -> bool:
    """True for a real file under ``root`` (not ``<frozen ...>`` or ``<string>``)."""
    return os.path.isabs(path) and is_within(root, path)


def _relative(root: str, path: str) -> str:
    return os.path.relpath(os.path.realpath(path), os.path.realpath(root)).replace(os.sep, "/")


def _names(exc: ModuleNotFoundError, module: str) -> bool:
    """True if ``exc`` says ``module`` itself (or a package above it) does not exist."""
    missing = exc.name
    return missing is not None and (module == missing or module.startswith(missing + "."))


def _no_initialize(context: Any) -> None:
    """Handler classes without ``initialize`` need no load-time step."""
