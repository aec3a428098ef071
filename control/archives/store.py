"""The model store: resolve a register ``url`` to an archive, inspect it, unpack it.

:meth:`ModelStore.resolve` follows TorchServe's ``ModelArchive.downloadModel`` order and
messages (``docs/torchserve-compat.md#resolving-the-url``) with a default-deny URL
policy: only names inside the model store, or URLs fully matching an ``allowed_urls``
pattern. An archive is a ``.mar`` zip, a tar.gz (any other file name) or a directory.
Inspection reads only ``MAR-INF/MANIFEST.json`` and the ``configFile`` it names, in
memory; nothing is unpacked. :meth:`ModelStore.extract` unpacks into an empty
directory for a worker, re-checking every member and counting the bytes it really
writes.

Every member is checked before anything is written: no absolute names, drive letters
or ``..`` components, no links leading outside the archive, no devices or fifos, at
most ``max_archive_entries`` members and ``max_archive_bytes`` declared in total, and
no zip bombs: above :attr:`Limits.ratio_free_bytes`, neither one zip member nor the
whole archive may declare more than :attr:`Limits.max_ratio` times its compressed size
(``control.archives.unpack.check``). These checks run at registration, so a bomb is refused
before it is ever registered. Messages name the reason, never a filesystem path.

An archive name (the url's basename) longer than :data:`NAME_MAX` bytes cannot exist in
the model store: a local one is "not found", a download is refused before fetching.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from control.archives import unpack
from control.archives.download import decodings, fetch_url, has_relative_path, matches_allowed
from control.archives.unpack import Member, Reader, invalid, open_reader
from control.core.errors import (
    DownloadArchiveException,
    InternalServerException,
    InvalidModelException,
    ModelNotFoundException,
)
from control.core.settings import Settings

MANIFEST = "MAR-INF/MANIFEST.json"
#: Largest MANIFEST.json / model-config.yaml read into memory.
METADATA_LIMIT = 1024 * 1024
RUNTIMES = frozenset({"python", "python3", "LSP"})
MANIFEST_STRINGS = (
    "modelName",
    "modelVersion",
    "handler",
    "serializedFile",
    "modelFile",
    "configFile",
    "requirementsFile",
)

#: Longest file name (bytes) of Linux file systems (ext4, xfs, tmpfs, NFS).
NAME_MAX = 255

_LOOKS_LIKE_URL = re.compile(r"(file|https?|ftp|s3)://", re.IGNORECASE)
_TMP_PREFIX = ".mqserve-download-"

Fetch = Callable[[str, Path, int], None]


@dataclass(frozen=True)
class Limits:
    """Upper bounds for one archive."""

    max_download_bytes: int = 4 * 1024**3
    max_archive_bytes: int = 16 * 1024**3  # total unpacked size
    max_archive_entries: int = 10_000
    #: Largest uncompressed / compressed size ratio of a zip member and of a whole archive
    #: (``.mar`` or tar.gz). Model files reach 2 to 10; deflate's maximum is about 1032.
    max_ratio: int = 200
    #: Sizes up to this many bytes are exempt from ``max_ratio`` (a small file of
    #: zeros or repeated text compresses well and harms nobody).
    ratio_free_bytes: int = 8 * 1024**2


@dataclass(frozen=True)
class ArchiveInfo:
    """What :meth:`ModelStore.resolve` found."""

    #: Basename of the file or directory inside the model store.
    archive: str
    #: True when fetched from a remote URL (the file is deleted on unregister).
    downloaded: bool
    #: Validated ``MAR-INF/MANIFEST.json``; ``{}`` when the archive has none.
    manifest: dict[str, Any]
    #: Parsed model-config.yaml named by ``model.configFile``; ``{}`` if none.
    model_config: dict[str, Any]


class ModelStore:
    """The model store directory and the URL policy in front of it."""

    def __init__(
        self,
        root: Path | None,
        allowed_urls: Sequence[str],
        limits: Limits = Limits(),
        fetch: Fetch | None = None,
    ) -> None:
        self._root = root
        self._allowed = tuple(allowed_urls)
        self._limits = limits
        self._fetch: Fetch = fetch or self._fetch_allowed

    def _fetch_allowed(self, url: str, target: Path, limit: int) -> None:
        fetch_url(url, target, limit, self._allowed)

    # -- resolve ------------------------------------------------------------------------

    def resolve(self, url: str) -> ArchiveInfo:
        """Find or download the archive ``url`` names and validate its metadata."""
        if self._root is None:
            raise ModelNotFoundException("Model store has not been configured.")
        if url == "":
            raise ModelNotFoundException("empty url")
        if has_relative_path(url):
            raise _relative(url)
        basename = _basename(url)
        if matches_allowed(url, self._allowed):
            return self._download(self._root, url, basename)
        if _LOOKS_LIKE_URL.match(url):
            raise ModelNotFoundException(f"Given URL {url} does not match any allowed URL(s)")
        return self._local(self._root, url, basename)

    def _download(self, root: Path, url: str, basename: str) -> ArchiveInfo:
        failed = DownloadArchiveException(f"Failed to download archive from: {url}")
        if basename in ("", ".") or "\x00" in basename or _too_long(basename):
            raise failed
        target = root / basename
        if os.path.lexists(target):
            raise InternalServerException(f"Model file already exists {basename}")
        tmp: Path | None = None
        try:
            try:
                fd, name = tempfile.mkstemp(dir=root, prefix=_TMP_PREFIX, suffix=".part")
                os.close(fd)
                tmp = Path(name)
                self._fetch(url, tmp, self._limits.max_download_bytes)
            except Exception as exc:  # any fetch failure, whatever the fetcher raises
                raise failed from exc
            manifest, config = self._inspect(tmp, _kind(basename))
            _publish(tmp, target, url, basename)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return ArchiveInfo(basename, True, manifest, config)

    def _local(self, root: Path, url: str, basename: str) -> ArchiveInfo:
        path = root / basename
        missing = ModelNotFoundException(f"Model not found at: {url}")
        if basename in ("", ".") or basename.startswith(_TMP_PREFIX) or _too_long(basename):
            raise missing
        try:
            if path.is_dir():
                kind = "dir"
            elif path.is_file():
                kind = _kind(basename)
            else:
                raise missing
        except OSError:  # ENAMETOOLONG for a model store path near PATH_MAX, EACCES
            raise missing from None
        manifest, config = self._inspect(path, kind)
        return ArchiveInfo(basename, False, manifest, config)

    def _inspect(self, path: Path, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
        with open_reader(path, kind, self._check_total) as reader:
            members = self._checked_members(reader)
            root = model_root(members)
            manifest = parse_manifest(reader.read(_join(root, MANIFEST), METADATA_LIMIT))
            return manifest, _read_config(reader, root, manifest)

    def _checked_members(self, reader: Reader) -> list[Member]:
        limits = self._limits
        members = reader.members(limits.max_archive_entries)
        unpack.check(
            members,
            limits.max_archive_entries,
            limits.max_archive_bytes,
            reader.packed_bytes,
            limits.max_ratio,
            limits.ratio_free_bytes,
        )
        return members

    def _check_total(self, total: int, packed_bytes: int | None) -> None:
        """``unpack.check_total`` with this store's limits (a tar.gz's running total)."""
        limits = self._limits
        unpack.check_total(
            total, limits.max_archive_bytes, packed_bytes, limits.max_ratio, limits.ratio_free_bytes
        )

    # -- remove / extract ---------------------------------------------------------------

    def remove(self, info_or_archive_name: ArchiveInfo | str) -> None:
        """Delete a downloaded archive file from the store; a missing file is no error."""
        name = info_or_archive_name
        if isinstance(name, ArchiveInfo):
            name = name.archive
        path = self._entry(name)
        if path is None:
            return
        if path.is_dir() and not path.is_symlink():
            raise ValueError("only archive files are removed, not directories")
        path.unlink(missing_ok=True)

    def extract(self, archive: str, dest: Path) -> Path:
        """Unpack store entry ``archive`` into the empty directory ``dest``.

        Returns the model directory: the one holding ``MAR-INF``, or ``dest`` itself.
        On failure everything written under ``dest`` is removed again. What it writes
        is the owner's alone (directories 0700, files without group or other bits;
        ``control.archives.unpack``); ``dest`` itself is the caller's to make private.
        """
        path = self._entry(archive)
        if path is None or not os.path.lexists(path):
            raise ModelNotFoundException(f"Model not found at: {archive}")
        if not dest.is_dir() or any(dest.iterdir()):
            raise ValueError("extract needs an existing, empty destination directory")
        kind = "dir" if path.is_dir() else _kind(archive)
        try:
            with open_reader(path, kind, self._check_total) as reader:
                members = self._checked_members(reader)
                reader.extract(members, dest, self._limits.max_archive_bytes)
        except BaseException:
            _clear(dest)
            raise
        root = model_root(members)
        return dest / root if root else dest

    def _entry(self, name: str) -> Path | None:
        if not name or name == "." or ".." in name or "/" in name or "\\" in name:
            raise ValueError("an archive name is a plain file name inside the model store")
        return None if self._root is None else self._root / name


def model_store(settings: Settings) -> ModelStore:
    """The model store as ``settings`` describe it (its directory, URL policy, limits)."""
    return ModelStore(
        settings.model_store,
        settings.allowed_urls,
        Limits(
            max_download_bytes=settings.max_download_bytes,
            max_archive_bytes=settings.max_archive_bytes,
            max_archive_entries=settings.max_archive_entries,
        ),
    )


# -- metadata -------------------------------------------------------------------------


def parse_manifest(data: bytes | None) -> dict[str, Any]:
    """Validate MANIFEST.json bytes (``None``: no manifest, allowed)."""
    if data is None:
        return {}
    if len(data) > METADATA_LIMIT:
        raise invalid("MANIFEST.json is too large")
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError):
        raise invalid("MANIFEST.json is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise invalid("MANIFEST.json is not a JSON object")
    model = manifest.get("model", {})
    if not isinstance(model, dict):
        raise invalid("MANIFEST.json model is not an object")
    for key in MANIFEST_STRINGS:
        if key in model and not isinstance(model[key], str):
            raise invalid(f"MANIFEST.json model.{key} is not a string")
    if "runtime" in manifest and manifest["runtime"] not in RUNTIMES:
        raise InvalidModelException("Runtime is not defined or invalid.")
    return manifest


def parse_model_config(data: bytes) -> dict[str, Any]:
    """Parse model-config.yaml with ``yaml.safe_load``; must be a mapping or empty."""
    if len(data) > METADATA_LIMIT:
        raise invalid("model-config.yaml is too large")
    try:
        config = yaml.safe_load(data)
    except (yaml.YAMLError, RecursionError):
        raise invalid("model-config.yaml is not valid YAML") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise invalid("model-config.yaml is not a mapping")
    return config


def _read_config(reader: Reader, root: str, manifest: dict[str, Any]) -> dict[str, Any]:
    name = manifest.get("model", {}).get("configFile")
    if not name:
        return {}
    base = re.split(r"[/\\]", name)[-1]
    data = None if base in ("", ".", "..") else reader.read(_join(root, base), METADATA_LIMIT)
    if data is None:
        raise invalid("model-config.yaml named in the manifest is missing")
    return parse_model_config(data)


def model_root(members: Sequence[Member]) -> str:
    """The archive's model directory: its top, or its only top-level directory."""
    tops: dict[str, bool] = {}
    for member in members:
        head, sep, _ = member.name.partition("/")
        if head:
            tops[head] = tops.get(head, False) or bool(sep) or member.kind == "dir"
    if len(tops) != 1 or "MAR-INF" in tops:
        return ""
    ((name, is_dir),) = tops.items()
    return name if is_dir else ""


# -- helpers --------------------------------------------------------------------------


def _relative(url: str) -> ModelNotFoundException:
    return ModelNotFoundException(f"Relative path is not allowed in url: {url}")


def _basename(url: str) -> str:
    """Last path component: of the URL path (query and fragment dropped) for URLs.

    A component holding ``/`` or ``\\`` once percent-decoded is a relative path.
    """
    if "://" in url:
        rest = re.split(r"[?#]", url.split("://", 1)[1], maxsplit=1)[0]
        raw = rest.partition("/")[2].rsplit("/", 1)[-1]
    else:
        raw = re.split(r"[/\\]", url)[-1]
    if any("/" in text or "\\" in text for text in decodings(raw)):
        raise _relative(url)
    return unquote(raw) if "://" in url else raw


def _too_long(basename: str) -> bool:
    return len(os.fsencode(basename)) > NAME_MAX


def _kind(name: str) -> str:
    return "zip" if name.endswith(".mar") else "tar"


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _publish(tmp: Path, target: Path, url: str, basename: str) -> None:
    """Link ``tmp`` to ``target``, failing if ``target`` exists (exactly one winner)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise InternalServerException(f"Model file already exists {basename}") from None
    except OSError:
        raise InternalServerException(f"Failed to save model: {url}") from None


def _clear(dest: Path) -> None:
    """Remove everything inside ``dest`` (never following symlinks)."""
    with os.scandir(dest) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
