"""Archive members: list, check and safely unpack zip, tar.gz and directory archives.

A :class:`Reader` lists an archive's members as :class:`Member` records (normalised
``a/b/c`` names), reads one small member into memory, and extracts. :func:`check`
holds the member rules shared by all three formats. Extraction writes regular files
with ``O_EXCL | O_NOFOLLOW``, creates symlinks last and re-checks where each really
points, counts the bytes it writes against the size limit, and leaves ``tarfile`` to
its ``data`` filter. What extraction creates is its owner's alone, whatever modes the
archive records: directories are 0700, files keep at most their owner's bits (0600, or
0700 for an executable tar member), so a model's files never become readable by other
users on the host. Every failure is an :class:`InvalidModelException` whose message
names a reason, never a path.

Zip bombs are refused from what the archive declares, before anything is decompressed:
a zip member's declared size against its compressed size, and the declared total of any
archive against the archive file's size (:func:`check`, :func:`check_total`). A tar.gz
can only be listed by decompressing it, so :class:`TarReader` applies ``check_total``
to the running total and stops listing at the first member past it. Declared sizes are
what extraction writes at most (zip members are cut at their declared size; tar copies
exactly it).
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from control.core.errors import InvalidModelException

CHUNK = 64 * 1024
#: Mode of every directory extraction creates (the umask can only narrow it).
DIR_MODE = 0o700
#: Mode of every regular file written from a zip or directory archive.
FILE_MODE = 0o600
#: The permission bits a tar member may keep: its owner's.
OWNER_BITS = 0o700
#: Longest symlink target read from a zip member.
LINK_LIMIT = 4096

Kind = Literal["file", "dir", "symlink", "hardlink", "other"]
#: ``(declared total so far, archive file size)``; raises to refuse the archive.
TotalCheck = Callable[[int, int | None], None]

_SEPARATORS = re.compile(r"[/\\]")
_DRIVE = re.compile(r"[A-Za-z]:")
_UNREADABLE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,  # unsupported zip compression
    RuntimeError,  # encrypted zip member
)
_UNREADABLE_REASON = {"zip": "not a readable zip file", "dir": "directory cannot be read"}


def invalid(reason: str) -> InvalidModelException:
    """The 400 for a bad archive: ``Invalid model archive: <reason>``."""
    return InvalidModelException(f"Invalid model archive: {reason}")


@dataclass(frozen=True)
class Member:
    """One archive entry. ``target``: a symlink's text, or a hardlink's member name."""

    name: str
    kind: Kind
    size: int = 0
    target: str = ""
    #: Compressed size of a zip member; ``None`` where members are not compressed one
    #: by one (tar.gz, directories).
    packed: int | None = None


class Reader(Protocol):
    """One open archive."""

    #: The archive file's size in bytes (compressed); ``None`` for a directory.
    packed_bytes: int | None

    def members(self, max_entries: int) -> list[Member]:
        """All members; raises past ``max_entries`` without listing the rest."""

    def read(self, name: str, limit: int) -> bytes | None:
        """Up to ``limit + 1`` bytes of regular-file member ``name``; ``None`` if absent."""

    def extract(self, members: list[Member], dest: Path, max_bytes: int) -> None:
        """Unpack checked ``members`` into the empty directory ``dest``."""


# -- rules --------------------------------------------------------------------------


def parts(name: str) -> list[str]:
    """Path components of a member name; refuses absolute names and ``..``."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise invalid("member with an absolute path")
    result = [p for p in _SEPARATORS.split(name) if p not in ("", ".")]
    if ".." in result:
        raise invalid("member with a relative path (..)")
    return result


def check(
    members: Sequence[Member],
    max_entries: int,
    max_bytes: int,
    packed_bytes: int | None = None,
    max_ratio: int | None = None,
    ratio_free_bytes: int = 0,
) -> None:
    """Apply the member rules; raise on the first violation.

    With ``max_ratio``, a zip member declaring more than ``ratio_free_bytes`` and more
    than ``max_ratio`` times its compressed size is refused, and so is an archive whose
    declared total is above both ``ratio_free_bytes`` and ``max_ratio`` times
    ``packed_bytes`` (the archive file's size).
    """
    if len(members) > max_entries:
        raise invalid("too many entries")
    total = 0
    for member in members:
        parts(member.name)
        if member.kind == "other":
            raise invalid("device or fifo member")
        if member.kind == "symlink":
            _check_link(member.name.rpartition("/")[0], member.target)
        elif member.kind == "hardlink":
            _check_link("", member.target)
        if _bomb(member.size, member.packed, max_ratio, ratio_free_bytes):
            raise invalid("member compression ratio exceeds the limit (zip bomb)")
        total += member.size
    check_total(total, max_bytes, packed_bytes, max_ratio, ratio_free_bytes)


def check_total(
    total: int,
    max_bytes: int,
    packed_bytes: int | None = None,
    max_ratio: int | None = None,
    ratio_free_bytes: int = 0,
) -> None:
    """Refuse a declared total above ``max_bytes``, or a bomb's ratio (see :func:`check`)."""
    if total > max_bytes:
        raise invalid("unpacked size exceeds the limit")
    if _bomb(total, packed_bytes, max_ratio, ratio_free_bytes):
        raise invalid("compression ratio exceeds the limit (zip bomb)")


def _bomb(size: int, packed: int | None, max_ratio: int | None, ratio_free_bytes: int) -> bool:
    """True for ``size`` declared bytes from ``packed`` compressed ones past the ratio."""
    if max_ratio is None or packed is None:
        return False
    return size > ratio_free_bytes and size > max_ratio * max(packed, 1)


def _check_link(base: str, target: str) -> None:
    if not target or target.startswith(("/", "\\")) or _DRIVE.match(target):
        raise invalid("link pointing outside the archive")
    depth = 0
    for part in _SEPARATORS.split(f"{base}/{target}"):
        if part == "..":
            depth -= 1
        elif part not in ("", "."):
            depth += 1
        if depth < 0:
            raise invalid("link pointing outside the archive")


def is_within(root: str, path: str) -> bool:
    """True when ``path`` is ``root`` or below it, both taken as real paths."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    try:
        return os.path.commonpath([real_root, real]) == real_root
    except ValueError:  # different drives
        return False


def _normal(name: str) -> str:
    return "/".join(parts(name))


def _too_many(count: int, max_entries: int) -> None:
    if count > max_entries:
        raise invalid("too many entries")


@contextmanager
def open_reader(path: Path, kind: str, total_check: TotalCheck | None = None) -> Iterator[Reader]:
    """Open ``path`` as ``zip``, ``tar`` (gzip) or ``dir``; unreadable → 400.

    ``total_check(total, packed_bytes)``: called by a tar.gz listing with the running
    declared total, raising to stop it (:func:`check_total`); zip and directory
    listings cost no decompression and are checked afterwards.
    """
    try:
        if kind == "dir":
            yield DirReader(path)
        elif kind == "zip":
            with zipfile.ZipFile(path) as zf:
                yield ZipReader(zf, os.path.getsize(path))
        else:
            with tarfile.open(path, "r:gz") as tf:
                yield TarReader(tf, os.path.getsize(path), total_check)
    except _UNREADABLE:
        raise invalid(_UNREADABLE_REASON.get(kind, "not a readable tar.gz file")) from None


# -- zip ----------------------------------------------------------------------------


class ZipReader:
    def __init__(self, zf: zipfile.ZipFile, packed_bytes: int) -> None:
        self._zf = zf
        self._infos: dict[str, zipfile.ZipInfo] = {}
        self.packed_bytes: int | None = packed_bytes

    def members(self, max_entries: int) -> list[Member]:
        infos = self._zf.infolist()
        _too_many(len(infos), max_entries)
        result = []
        for info in infos:
            name, kind = _normal(info.filename), _zip_kind(info)
            if kind == "symlink":
                member = Member(name, kind, 0, self._link_text(info))
            elif kind == "file":
                member = Member(name, kind, info.file_size, packed=info.compress_size)
            else:
                member = Member(name, kind)
            self._infos[name] = info
            result.append(member)
        return result

    def _link_text(self, info: zipfile.ZipInfo) -> str:
        if info.file_size > LINK_LIMIT:
            raise invalid("link pointing outside the archive")
        return self._zf.read(info).decode("utf-8", "replace")

    def read(self, name: str, limit: int) -> bytes | None:
        info = self._infos.get(name)
        if info is None:
            return None
        if _zip_kind(info) != "file":
            raise invalid(f"{name.rpartition('/')[2]} is not a regular file")
        with self._zf.open(info) as src:
            return src.read(limit + 1)

    def extract(self, members: list[Member], dest: Path, max_bytes: int) -> None:
        def source(member: Member) -> IO[bytes]:
            return self._zf.open(self._infos[member.name])

        write_members(members, dest, max_bytes, source)


def _zip_kind(info: zipfile.ZipInfo) -> Kind:
    mode = info.external_attr >> 16 if info.create_system == 3 else 0
    if info.is_dir() or stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file" if stat.S_IFMT(mode) in (0, stat.S_IFREG) else "other"


# -- tar.gz -------------------------------------------------------------------------


class TarReader:
    def __init__(
        self, tf: tarfile.TarFile, packed_bytes: int, total_check: TotalCheck | None = None
    ) -> None:
        self._tf = tf
        self._infos: dict[str, tarfile.TarInfo] = {}
        self.packed_bytes: int | None = packed_bytes
        self._total_check = total_check

    def members(self, max_entries: int) -> list[Member]:
        result: list[Member] = []
        total = 0
        # Streams: stops reading at the first entry too many, and before decompressing
        # past a declared total that is already too large (skipping a member's data
        # means inflating it).
        for info in self._tf:
            _too_many(len(result) + 1, max_entries)
            name, kind = _normal(info.name), _tar_kind(info)
            size = info.size if kind == "file" else 0
            total += size
            if self._total_check is not None:
                self._total_check(total, self.packed_bytes)
            self._infos[name] = info
            result.append(Member(name, kind, size, info.linkname))
        return result

    def read(self, name: str, limit: int) -> bytes | None:
        info = self._infos.get(name)
        if info is None:
            return None
        src = self._tf.extractfile(info) if info.isreg() else None
        if src is None:
            raise invalid(f"{name.rpartition('/')[2]} is not a regular file")
        with src:
            return src.read(limit + 1)

    def extract(self, members: list[Member], dest: Path, max_bytes: int) -> None:
        # A tar header's size is the exact byte count tarfile copies, so the declared
        # total already checked is what gets written; the data filter re-checks every
        # name and link target against ``dest`` and drops special bits (``_owner_only``
        # is that filter, narrowed further).
        self._tf.extractall(dest, members=self._tf.getmembers(), filter=_owner_only)  # noqa: S202
        # tarfile makes a member's missing parent directories with the umask's default
        # mode (0755 for most users), and only its own directory members with 0700.
        _restrict_dirs(dest)


def _owner_only(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter, then every group and other permission bit dropped."""
    member = tarfile.data_filter(member, dest)
    if member.mode is not None:
        member = member.replace(mode=member.mode & OWNER_BITS, deep=False)
    return member


def _restrict_dirs(top: Path) -> None:
    """Set every directory below ``top`` (never through a symlink) to :data:`DIR_MODE`."""
    for dirpath, dirnames, _ in os.walk(top):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):  # os.walk lists links to directories here too
                os.chmod(path, DIR_MODE)


def _tar_kind(info: tarfile.TarInfo) -> Kind:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    return "hardlink" if info.islnk() else "other"


# -- directory ----------------------------------------------------------------------


class DirReader:
    def __init__(self, top: Path) -> None:
        self._top = str(top)
        self.packed_bytes: int | None = None

    def members(self, max_entries: int) -> list[Member]:
        result: list[Member] = []

        def fail(error: OSError) -> None:
            raise error

        for dirpath, dirnames, filenames in os.walk(self._top, onerror=fail):
            for name in sorted(dirnames) + sorted(filenames):
                _too_many(len(result) + 1, max_entries)
                result.append(self._member(os.path.join(dirpath, name)))
        return result

    def _member(self, path: str) -> Member:
        name = os.path.relpath(path, self._top).replace(os.sep, "/")
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            if not is_within(self._top, path):
                raise invalid("link pointing outside the archive")
            return Member(name, "symlink", 0, os.readlink(path))
        if stat.S_ISDIR(info.st_mode):
            return Member(name, "dir")
        return Member(name, "file" if stat.S_ISREG(info.st_mode) else "other", info.st_size)

    def read(self, name: str, limit: int) -> bytes | None:
        path = os.path.join(self._top, *parts(name))
        if not os.path.lexists(path):
            return None
        label = name.rpartition("/")[2]
        if not is_within(self._top, path):
            raise invalid(f"{label} is a link pointing outside the archive")
        if not os.path.isfile(path):
            raise invalid(f"{label} is not a regular file")
        with open(path, "rb") as src:
            return src.read(limit + 1)

    def extract(self, members: list[Member], dest: Path, max_bytes: int) -> None:
        def source(member: Member) -> IO[bytes]:
            path = os.path.join(self._top, *parts(member.name))
            return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")

        write_members(members, dest, max_bytes, source)


# -- writing ------------------------------------------------------------------------


def write_members(
    members: list[Member], dest: Path, max_bytes: int, source: Callable[[Member], IO[bytes]]
) -> None:
    """Write directories and files, then symlinks; stop past ``max_bytes`` written."""
    root = os.path.realpath(dest)
    left = max_bytes
    links: list[tuple[str, str]] = []
    for member in members:
        out = _destination(root, member.name)
        if member.kind == "dir":
            _make_dirs(out)
        elif member.kind == "symlink":
            links.append((out, member.target))
        else:  # "file"; hardlinks only come from tar, which extracts by itself
            _make_dirs(os.path.dirname(out))
            with source(member) as src:
                left = _write_new(out, src, left)
    for out, target in links:
        _make_dirs(os.path.dirname(out))
        os.symlink(target, out)
    for out, _ in links:  # a chain of links can escape where each alone looks contained
        if not is_within(root, out):
            raise invalid("link pointing outside the archive")


def _make_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, but every new level gets :data:`DIR_MODE`.

    (``os.makedirs`` gives its mode to the last level only.) Links are made after all
    directories and files, so no level can be a symlink yet.
    """
    if os.path.isdir(path):
        return
    _make_dirs(os.path.dirname(path))
    os.mkdir(path, DIR_MODE)


def _destination(root: str, name: str) -> str:
    out = os.path.join(root, *parts(name))
    if not is_within(root, os.path.dirname(out)):
        raise invalid("member outside the destination")
    return out


def _write_new(path: str, src: IO[bytes], left: int) -> int:
    """Copy ``src`` into the new file ``path``; return the byte budget left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as dst:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            left -= len(chunk)
            if left < 0:
                raise invalid("unpacked size exceeds the limit")
            dst.write(chunk)
    return left
