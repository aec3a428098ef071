"""Build small but real model archives the way torch-model-archiver lays them out."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

NOOP_HANDLER = '''\
"""A handler that echoes its input: the smallest TorchServe-contract model."""


def handle(data, context):
    if data is None:
        return None
    return [row.get("body") or row.get("data") for row in data]
'''


def manifest(
    name: str | None,
    version: str | None = "1.0",
    handler: str = "noop_handler.py",
    config_file: str | None = None,
    runtime: str = "python",
) -> dict[str, object]:
    """A MANIFEST.json as torch-model-archiver 0.12 writes it."""
    model: dict[str, object] = {"handler": handler}
    if name is not None:
        model["modelName"] = name
    if version is not None:
        model["modelVersion"] = version
    if config_file is not None:
        model["configFile"] = config_file
    return {
        "createdOn": "25/11/2026 12:00:00",
        "runtime": runtime,
        "model": model,
        "archiverVersion": "0.12.0",
    }


def build_mar(
    path: Path,
    name: str | None,
    version: str | None = "1.0",
    *,
    handler: str = "noop_handler.py",
    config_yaml: str | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Write ``path`` as a .mar (zip) with a manifest, a handler and optional files."""
    files: dict[str, bytes] = {"noop_handler.py": NOOP_HANDLER.encode()}
    config_file = None
    if config_yaml is not None:
        config_file = "model-config.yaml"
        files[config_file] = config_yaml.encode()
    files.update(extra or {})
    files["MAR-INF/MANIFEST.json"] = json.dumps(
        manifest(name, version, handler, config_file), indent=2
    ).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


def build_tgz(path: Path, name: str, version: str = "1.0") -> Path:
    """Write ``path`` as torch-model-archiver's tgz format (everything under ``name/``)."""
    files = {
        f"{name}/noop_handler.py": NOOP_HANDLER.encode(),
        f"{name}/MAR-INF/MANIFEST.json": json.dumps(manifest(name, version)).encode(),
    }
    with tarfile.open(path, "w:gz") as tf:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
