"""Where workers unpack archives: per stack and host, private, shared per version, and
deleted when the version's last worker on the host has exited (workers.supervisor.spawn)."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import signal
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest

from control.archives.store import ModelStore
from control.core import observed
from control.core.home import Home
from control.core.registry import Registry, VersionRecord
from control.core.settings import Settings
from tests.support.archives import build_mar, build_tgz
from tests.support.handlers import make_spec
from workers.model_files import ModelFiles, host_component, registration_tag
from workers.supervisor.loop import Supervisor
from workers.supervisor.spawn import adopt_leftovers


@pytest.fixture(autouse=True)
def _permissive_umask() -> Iterator[None]:
    """A umask of 0 would let every mode through: what is private must be made so."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tree_modes(top: Path) -> dict[str, int]:
    """``relative path -> permission bits`` of everything below ``top`` (links skipped)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                found[str(path.relative_to(top))] = mode(path)
    return found


def record(spec_name: str = "tiny", registered_at: float = 1000.0) -> VersionRecord:
    return VersionRecord(make_spec("h.py", name=spec_name), 1, 1, 1, True, registered_at)


def write_handler(dest: Path) -> Path:
    (dest / "handler.py").write_text("def handle(data, context):\n    return data\n")
    return dest


# -- paths ------------------------------------------------------------------------------


def test_files_live_in_the_stacks_home_per_host(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")
    assert files.root == Home.at(tmp_path / "home").models_dir / "h1"
    assert files.version_dir("noop", "1.0") == tmp_path / "home" / "models" / "h1" / "noop" / "1.0"
    other = ModelFiles.of(tmp_path / "other-home", "h1")
    assert not other.root.is_relative_to(files.root.parent)


@pytest.mark.parametrize("host", ["../etc", "a/b", "", ".", ".hidden", "x" * 65, "h\x00"])
def test_unsafe_host_names_are_hashed(host: str) -> None:
    component = host_component(host)
    assert component.startswith("host-") and len(component) == 21
    assert "/" not in component and component != host_component(host + "z")


@pytest.mark.parametrize("host", ["h1", "gpu-node.example.com", "worker_2"])
def test_plain_host_names_are_kept(host: str) -> None:
    assert host_component(host) == host


def test_registration_tag_changes_with_each_registration() -> None:
    first = record()
    assert registration_tag(first) == registration_tag(record())
    assert registration_tag(first) != registration_tag(record(registered_at=1000.5))
    other_archive = dataclasses.replace(first, spec=dataclasses.replace(first.spec, archive="b"))
    assert registration_tag(first) != registration_tag(other_archive)
    assert registration_tag(dataclasses.replace(first, min_workers=4)) == registration_tag(first)


# -- unpacking ----------------------------------------------------------------------------


def test_unpack_makes_private_directories_and_runs_extract_once(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")
    calls: list[Path] = []

    def extract(dest: Path) -> Path:
        calls.append(dest)
        return write_handler(dest)

    first = files.unpack("noop", "1.0", "abc", extract)
    second = files.unpack("noop", "1.0", "abc", extract)

    assert first == second == files.version_dir("noop", "1.0") / "abc"
    assert (first / "handler.py").is_file()
    assert len(calls) == 1 and calls[0].parent == first.parent and not calls[0].exists()
    home = tmp_path / "home"
    for level in (home, home / "models", files.root, first.parent.parent, first.parent, first):
        assert mode(level) == 0o700, level
        assert os.lstat(level).st_uid == os.getuid()


def test_existing_levels_are_made_private(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")
    files.root.mkdir(parents=True, mode=0o755)
    (tmp_path / "home" / "models").chmod(0o777)
    files.unpack("noop", "1.0", "abc", write_handler)
    assert mode(tmp_path / "home" / "models") == 0o700
    assert mode(files.root) == 0o700


def test_extract_runs_under_the_lock_and_out_of_sight(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")
    final = files.version_dir("noop", "1.0") / "abc"
    seen: dict[str, object] = {}

    def extract(dest: Path) -> Path:
        seen["final_exists"] = final.exists()
        seen["staging_mode"] = mode(dest)
        fd = os.open(final.parent / ".abc.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another worker's attempt
            seen["locked"] = False
        except BlockingIOError:
            seen["locked"] = True
        finally:
            os.close(fd)
        return write_handler(dest)

    files.unpack("noop", "1.0", "abc", extract)
    assert seen == {"final_exists": False, "staging_mode": 0o700, "locked": True}


def test_failed_extract_leaves_nothing_and_the_next_worker_retries(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")

    def broken(dest: Path) -> Path:
        (dest / "half.bin").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.unpack("noop", "1.0", "abc", broken)
    parent = files.version_dir("noop", "1.0")
    assert sorted(p.name for p in parent.iterdir()) == [".abc.lock"]
    assert (files.unpack("noop", "1.0", "abc", write_handler) / "handler.py").is_file()


def test_a_tgz_top_directory_becomes_the_model_directory(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    build_tgz(store_dir / "noop.tar.gz", "noop")
    store = ModelStore(store_dir, ())
    files = ModelFiles.of(tmp_path / "home", "h1")
    root = files.unpack("noop", "1.0", "abc", lambda d: store.extract("noop.tar.gz", d))
    assert root == files.version_dir("noop", "1.0") / "abc"
    assert (root / "MAR-INF" / "MANIFEST.json").is_file()
    assert sorted(p.name for p in root.parent.iterdir()) == [".abc.lock", "abc"]


# -- extraction never widens permissions -------------------------------------------------


def test_zip_members_are_private(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    build_mar(store_dir / "m.mar", "m", extra={"deep/er/weights.bin": b"w", "deep/": b""})
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    ModelStore(store_dir, ()).extract("m.mar", dest)
    modes = tree_modes(dest)
    assert modes["deep"] == modes["deep/er"] == modes["MAR-INF"] == 0o700
    assert modes["deep/er/weights.bin"] == modes["noop_handler.py"] == 0o600


def test_directory_archive_files_are_private(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    source = store_dir / "m"
    (source / "sub").mkdir(parents=True, mode=0o777)
    (source / "sub" / "data.txt").write_text("d")
    (source / "sub" / "data.txt").chmod(0o666)
    (source / "noop_handler.py").write_text("def handle(d, c):\n    return d\n")
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    ModelStore(store_dir, ()).extract("m", dest)
    assert tree_modes(dest) == {"sub": 0o700, "sub/data.txt": 0o600, "noop_handler.py": 0o600}


def test_tar_members_keep_only_their_owners_bits(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    members = [
        ("m/open", tarfile.DIRTYPE, 0o777, b""),
        ("m/open/run.sh", tarfile.REGTYPE, 0o777, b"#!/bin/sh\n"),
        ("m/implicit/parent/weights.bin", tarfile.REGTYPE, 0o644, b"w"),
        ("m/MAR-INF/MANIFEST.json", tarfile.REGTYPE, 0o664, b"{}"),
    ]
    with tarfile.open(store_dir / "m.tar.gz", "w:gz") as tf:
        for name, kind, bits, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size = kind, bits, len(data)
            tf.addfile(info, io.BytesIO(data))
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    root = ModelStore(store_dir, ()).extract("m.tar.gz", dest)
    assert root == dest / "m"
    assert tree_modes(dest) == {
        "m": 0o700,
        "m/open": 0o700,
        "m/implicit": 0o700,
        "m/MAR-INF": 0o700,
        "m/open/run.sh": 0o700,
        "m/implicit/parent": 0o700,
        "m/implicit/parent/weights.bin": 0o600,
        "m/MAR-INF/MANIFEST.json": 0o600,
    }


# -- removal ------------------------------------------------------------------------------


def test_remove_deletes_one_version_only(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")
    for model, version in (("noop", "1.0"), ("noop", "2.0"), ("other", "1.0")):
        files.unpack(model, version, "abc", write_handler)
    neighbour = ModelFiles.of(tmp_path / "home", "h2")
    neighbour.unpack("noop", "1.0", "abc", write_handler)

    files.remove("noop", "1.0")
    assert not files.version_dir("noop", "1.0").exists()
    assert (files.version_dir("noop", "2.0") / "abc" / "handler.py").is_file()
    assert (neighbour.version_dir("noop", "1.0") / "abc" / "handler.py").is_file()
    files.remove("noop", "2.0")
    assert not (files.root / "noop").exists()  # the emptied model directory goes too
    assert sorted(p.name for p in files.root.iterdir()) == ["other"]
    files.remove("noop", "2.0")  # already gone: no error


def test_clear_deletes_this_hosts_files_only(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")
    files.unpack("noop", "1.0", "abc", write_handler)
    neighbour = ModelFiles.of(tmp_path / "home", "h2")
    neighbour.unpack("noop", "1.0", "abc", write_handler)
    interrupted = files.root.parent / ".h1.removing-0123"
    (interrupted / "x").mkdir(parents=True)

    files.clear()
    assert sorted(p.name for p in files.root.parent.iterdir()) == ["h2"]
    files.clear()  # nothing left: no error


def test_a_start_with_nothing_to_adopt_clears_the_hosts_files(tmp_path: Path) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    files = ModelFiles.of(tmp_path / "home", "h1")
    files.unpack("noop", "1.0", "abc", write_handler)
    assert adopt_leftovers(client, "h1", files) == []
    assert not files.root.exists()


def test_keep_only_keeps_the_versions_adopted_workers_use(tmp_path: Path) -> None:
    files = ModelFiles.of(tmp_path / "home", "h1")
    for model, version in (("noop", "1.0"), ("noop", "2.0"), ("other", "1.0")):
        files.unpack(model, version, "abc", write_handler)
    files.keep_only({("noop", "2.0")})
    assert not files.version_dir("noop", "1.0").exists()
    assert not files.version_dir("other", "1.0").exists()
    assert (files.version_dir("noop", "2.0") / "abc").is_dir()


# -- the supervisor counts references -----------------------------------------------------


class FakeWorker:
    """A worker process that unpacked its model, drains at once on SIGTERM."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.returncode = 0 if sig == signal.SIGTERM else -sig

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None
        return self.returncode


class Fleet:
    """Supervisor, registry and fake workers of host ``h1`` over fakeredis."""

    def __init__(self, home: Path) -> None:
        self.client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
        self.registry = Registry(self.client)
        self.files = ModelFiles.of(home, "h1")
        self.workers: dict[str, FakeWorker] = {}
        self.supervisor = Supervisor(Settings(home=home), self.client, "h1", self.spawn)

    def spawn(self, wid: str, model: str, version: str, slot: int, gpu: int) -> FakeWorker:
        # What workers.worker.process.load does first: unpack (or reuse) the version's files.
        tag = registration_tag(self.registry.get(model, version))
        self.files.unpack(model, version, tag, write_handler)
        self.workers[wid] = FakeWorker(10_000 + len(self.workers))
        return self.workers[wid]

    def alive(self) -> list[str]:
        return [wid for wid, w in self.workers.items() if w.returncode is None]

    def settle(self) -> None:
        """Tick until no action is left (stops are answered at once by the fakes)."""
        for _ in range(10):
            if not self.supervisor.tick():
                return
        raise AssertionError("the supervisor did not settle")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    fleet = Fleet(tmp_path / "home")
    fleet.registry.register(make_spec("h.py", name="noop"), 2, 2)
    fleet.registry.register(make_spec("h.py", name="other"), 1, 1)
    return fleet


def test_files_stay_until_the_last_worker_of_the_version_exits(fleet: Fleet) -> None:
    fleet.settle()
    assert len(fleet.alive()) == 3
    noop = fleet.files.version_dir("noop", "1.0")
    assert [p.name for p in noop.iterdir() if not p.name.startswith(".")] == [
        registration_tag(fleet.registry.get("noop", "1.0"))
    ]  # one copy shared by both workers

    fleet.registry.scale("noop", "1.0", 1, 1)
    fleet.settle()
    assert len(fleet.alive()) == 2 and noop.is_dir()

    fleet.registry.scale("noop", "1.0", 0, 0)
    fleet.settle()
    assert fleet.alive() and not noop.exists()
    assert fleet.files.version_dir("other", "1.0").is_dir()


def test_a_failed_worker_releases_its_reference(fleet: Fleet) -> None:
    fleet.settle()
    first, second = (r.wid for r in observed.workers_of(fleet.client, "noop", "1.0"))
    fleet.workers[first].returncode = 3  # a crash: not asked to stop
    fleet.supervisor.tick()
    assert fleet.files.version_dir("noop", "1.0").is_dir()  # the other still runs

    fleet.workers[second].returncode = 3
    fleet.supervisor.tick()
    assert not fleet.files.version_dir("noop", "1.0").exists()
    assert fleet.files.version_dir("other", "1.0").is_dir()


def test_shutdown_removes_every_version(fleet: Fleet) -> None:
    fleet.settle()
    fleet.supervisor.shutdown(timeout=5)
    assert not fleet.alive()
    assert list(fleet.files.root.iterdir()) == []
