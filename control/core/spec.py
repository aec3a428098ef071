"""What a registered model version is: :class:`ModelSpec`, and the rules for names.

A spec is the host-independent description of one model version: where its archive
lives (a name inside the shared model store), its handler and runtime, batching and
timeouts. It is written once at registration and never changed; the desired worker
counts, which do change, are kept beside it in the registry.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from control.core.errors import InvalidModelException

#: torch-model-archiver's rule: a letter, then letters, digits, ``_``, ``-`` or ``.``.
MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")
#: Versions as archives write them (``1.0``, ``2.1-beta``, ``3+cu121``); no ``:`` or ``/``.
MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*")
#: Longest model name and version (both ASCII). Each becomes one directory name under
#: ``$MQSERVE_HOME/models/<host>/<model>/<version>/`` (file names have at most 255
#: bytes; ``.<tag>.lock`` files sit beside versions), and both appear in Redis keys and
#: in the Celery queue name ``mqs.q.<model>.<version>``, which stay well within limits.
MAX_NAME_LENGTH = 200

VALID_RUNTIMES = ("python", "python3", "LSP")


def check_model_name(name: str) -> str:
    """Return ``name`` if it follows the archiver's naming rule, else raise a 400."""
    if len(name) > MAX_NAME_LENGTH or not MODEL_NAME.fullmatch(name):
        raise InvalidModelException(
            f"Invalid model name: {name[:MAX_NAME_LENGTH]}. A model name must start with a "
            "letter and contain only letters, digits, '_', '-' and '.'"
        )
    return name


def check_model_version(version: str) -> str:
    """Return ``version`` if it is usable in URLs and keys, else raise a 400."""
    if len(version) > MAX_NAME_LENGTH or not MODEL_VERSION.fullmatch(version):
        raise InvalidModelException(
            f"Invalid model version: {version[:MAX_NAME_LENGTH]}. A version must start with "
            "a letter or digit and contain only letters, digits, '_', '.', '+' and '-'"
        )
    return version


@dataclass(frozen=True)
class ModelSpec:
    """One registered model version, as every API process and supervisor sees it."""

    model_name: str
    version: str
    #: The ``url`` exactly as registered (TorchServe's ``modelUrl``).
    url: str
    #: The archive's name inside the model store (a file or a directory).
    archive: str
    #: True when the archive was downloaded from a remote url (deleted on unregister).
    downloaded: bool
    handler: str
    runtime: str = "python"
    batch_size: int = 1
    max_batch_delay: int = 100
    response_timeout: int = 120
    startup_timeout: int = 120
    max_retry_timeout: int = 300
    client_timeout_ms: int = 0
    job_queue_size: int = 100
    device_type: str = "cpu"
    device_ids: tuple[int, ...] | None = None
    parallel_type: str = ""
    parallel_level: int = 0
    continuous_batching: bool = False
    use_job_ticket: bool = False
    use_venv: bool = False
    stateful: bool = False
    sequence_max_idle_ms: int = 0
    sequence_timeout_ms: int = 0
    max_num_sequence: int = 0
    max_sequence_job_queue_size: int = 0
    loaded_at_startup: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialise for the registry."""
        data = dataclasses.asdict(self)
        if self.device_ids is not None:
            data["device_ids"] = list(self.device_ids)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        """Inverse of :meth:`to_json`, tolerant of fields added by later versions."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("device_ids") is not None:
            kwargs["device_ids"] = tuple(kwargs["device_ids"])
        return cls(**kwargs)
