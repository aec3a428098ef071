"""Model files: where a host's workers find their unpacked archives.

:class:`ModelFiles` lays them out as
``$MQSERVE_HOME/models/<host>/<model>/<version>/<registration>/``, mode 0700 all the way
down, so another stack on the same host (another home) never sees, shares
or deletes them, even for the same model name and version, and other users cannot read
them. The first worker of a version unpacks it (atomically, under a lock); the other
workers of that version on this host share the copy, as TorchServe's workers share one
extracted model directory (it is their cwd, so files a handler writes there are shared
too: handlers that write per-worker files must name them per process, as under
TorchServe). The supervisor deletes a version's files when its last worker on this
host has exited, and a restarted supervisor deletes what no adopted worker uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from control.core.home import Home
from control.core.registry import VersionRecord

#: Mode of every directory :class:`ModelFiles` makes: the stack's user's alone.
PRIVATE_DIR = 0o700
#: A host name used as a path component as it is; any other is hashed.
_PLAIN_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def registration_tag(record: VersionRecord) -> str:
    """A directory name for one registration of a model version.

    Unregistering a version and registering it again (perhaps from another archive)
    while an old worker still drains gives a new name, so no worker ever starts on the
    files of an earlier registration. Every worker computes the same name from Redis.
    """
    identity = f"{record.registered_at!r}\n{record.spec.to_json()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def host_component(host: str) -> str:
    """``host`` as one safe path component (a name with ``/`` or ``..`` is hashed)."""
    if _PLAIN_HOST.fullmatch(host):
        return host
    return "host-" + hashlib.sha256(host.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelFiles:
    """The unpacked archives of one host's workers of one stack (see the module doc).

    ``root`` is ``$MQSERVE_HOME/models/<host>``. Names starting with ``.`` below it are
    the class's own (locks, unpacks in progress, trees being deleted); model names,
    versions and host components never start with one.
    """

    root: Path

    @classmethod
    def of(cls, home: Path, host: str) -> ModelFiles:
        """The files of ``host``'s workers in the stack whose home is ``home``."""
        return cls(Home.at(home).models_dir / host_component(host))

    def version_dir(self, model: str, version: str) -> Path:
        """Every registration of one model version unpacked on this host."""
        return self.root / model / version

    def unpack(self, model: str, version: str, tag: str, extract: Callable[[Path], Path]) -> Path:
        """The model directory of registration ``tag``, unpacked first if not done yet.

        ``extract(dest)`` unpacks the archive into the empty private directory ``dest``
        and returns the model directory in it (``ModelStore.extract``). It runs under
        an exclusive lock, at most once per registration while the files exist, into a
        temporary directory beside the final one that is then renamed into place: a
        worker starting at the same time waits for the lock and never sees a half
        written tree, and a worker killed while unpacking leaves only a temporary
        directory (deleted with the version). Errors from ``extract`` propagate.
        """
        parent = self.version_dir(model, version)
        _private_dirs(parent, top=self.root.parent)
        final = parent / tag
        with _exclusive(parent / f".{tag}.lock"):
            if not final.is_dir():
                _unpack_into(final, extract)
        return final

    def remove(self, model: str, version: str) -> None:
        """Delete every unpacked registration of a version; only once none of its workers
        on this host runs (the supervisor's count). Missing files are no error."""
        path = self.version_dir(model, version)
        # Renamed away first, so that no half-deleted tree ever sits where a worker looks.
        if _discard(path, self.root / f".removing-{uuid.uuid4().hex}"):
            with contextlib.suppress(OSError):  # the model's directory, if now empty
                path.parent.rmdir()

    def keep_only(self, versions: set[tuple[str, str]]) -> None:
        """Delete every unpacked version of this host but ``versions`` (those adopted
        workers use), and whatever an interrupted removal left."""
        if not versions:
            self.clear()
            return
        for stale in self.root.glob(".removing-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for model_dir in (p for p in self.root.glob("*") if p.is_dir() and p.name[0] != "."):
            for version_dir in (p for p in model_dir.glob("*") if p.is_dir()):
                if (model_dir.name, version_dir.name) not in versions:
                    self.remove(model_dir.name, version_dir.name)

    def clear(self) -> None:
        """Delete everything unpacked for this host: what a dead supervisor's workers left."""
        parent = self.root.parent
        for stale in parent.glob(f".{self.root.name}.removing-*"):  # an interrupted clear
            shutil.rmtree(stale, ignore_errors=True)
        _discard(self.root, parent / f".{self.root.name}.removing-{uuid.uuid4().hex}")


def _private_dirs(path: Path, top: Path) -> None:
    """Make ``path`` and every level from ``top`` down to it a directory of mode 0700.

    Those levels are this stack's own, so existing ones are set to 0700 as well;
    missing levels above ``top`` (a new home) are created with 0700 and left alone
    once they exist.
    """
    if path != top and top in path.parents:
        _private_dirs(path.parent, top)
    elif not path.parent.is_dir():
        _private_dirs(path.parent, path.parent)
    with contextlib.suppress(FileExistsError):  # or another worker made it just now
        path.mkdir(PRIVATE_DIR)
    path.chmod(PRIVATE_DIR)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the kernel drops it if we die."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _unpack_into(final: Path, extract: Callable[[Path], Path]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))  # 0700
    try:
        root = extract(staging)
        # The model directory becomes ``final``: ``staging`` itself, or its only entry
        # (a tgz archive's top directory), which leaves ``staging`` empty.
        os.rename(root, final)
        final.chmod(PRIVATE_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard(path: Path, trash: Path) -> bool:
    """Rename ``path`` to ``trash`` and delete it; False if ``path`` did not exist."""
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True
