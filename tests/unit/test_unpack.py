"""Archive member rules and safe extraction (ModelStore.resolve/extract,
control.archives.unpack)."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from control.archives import unpack
from control.archives.store import Limits, ModelStore
from control.core.errors import InvalidModelException

MANIFEST = b'{"model": {"modelName": "m"}}'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "dest"
    path.mkdir(parents=True)
    return path


def store_of(root: Path, **limits: int) -> ModelStore:
    return ModelStore(root, (), Limits(**limits))


def tar_member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def write_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)


def invalid(reason: str) -> str:
    return f"Invalid model archive: {reason}"


def assert_refused(store: ModelStore, archive: str, dest: Path, reason: str) -> None:
    """Both resolve and extract refuse ``archive``; extract leaves ``dest`` empty."""
    for call in (lambda: store.resolve(archive), lambda: store.extract(archive, dest)):
        with pytest.raises(InvalidModelException) as info:
            call()
        assert info.value.message == invalid(reason)
        assert info.value.status == 400
    assert list(dest.iterdir()) == []


# -- tar rules ------------------------------------------------------------------------

BAD_TARS = [
    ([tar_member("../x", data=b"evil")], "member with a relative path (..)"),
    ([tar_member("m/../../x", data=b"evil")], "member with a relative path (..)"),
    ([tar_member("/etc/x", data=b"evil")], "member with an absolute path"),
    ([tar_member("C:/x", data=b"evil")], "member with an absolute path"),
    ([tar_member("root", tarfile.SYMTYPE, link="/")], "link pointing outside the archive"),
    ([tar_member("m/up", tarfile.SYMTYPE, link="../../x")], "link pointing outside the archive"),
    (
        [tar_member("hard", tarfile.LNKTYPE, link="../../etc/passwd")],
        "link pointing outside the archive",
    ),
    (
        [tar_member("hard", tarfile.LNKTYPE, link="/etc/passwd")],
        "link pointing outside the archive",
    ),
    ([tar_member("dev", tarfile.CHRTYPE)], "device or fifo member"),
    ([tar_member("blk", tarfile.BLKTYPE)], "device or fifo member"),
    ([tar_member("fifo", tarfile.FIFOTYPE)], "device or fifo member"),
]


@pytest.mark.parametrize(("members", "reason"), BAD_TARS)
def test_bad_tar_members(
    root: Path,
    dest: Path,
    tmp_path: Path,
    members: list[tuple[tarfile.TarInfo, bytes]],
    reason: str,
) -> None:
    write_tar(root / "m.tar.gz", members)
    assert_refused(store_of(root), "m.tar.gz", dest, reason)
    assert not (tmp_path / "x").exists() and not (tmp_path / "work" / "x").exists()


def test_contained_tar_links_extract(root: Path, dest: Path) -> None:
    write_tar(
        root / "m.tar.gz",
        [
            tar_member("m", tarfile.DIRTYPE),
            tar_member("m/MAR-INF/MANIFEST.json", data=MANIFEST),
            tar_member("m/weights.bin", data=b"w" * 100),
            tar_member("m/sub/alias", tarfile.SYMTYPE, link="../weights.bin"),
            tar_member("m/copy", tarfile.LNKTYPE, link="m/weights.bin"),
        ],
    )
    store = store_of(root)
    assert store.resolve("m.tar.gz").manifest == {"model": {"modelName": "m"}}
    model = store.extract("m.tar.gz", dest)
    assert model == dest / "m"
    assert (model / "sub" / "alias").read_bytes() == b"w" * 100
    assert (model / "copy").read_bytes() == b"w" * 100


def test_too_many_tar_entries(root: Path, dest: Path) -> None:
    write_tar(root / "m.tar.gz", [tar_member(f"f{i}") for i in range(51)])
    assert_refused(store_of(root, max_archive_entries=50), "m.tar.gz", dest, "too many entries")
    write_tar(root / "ok.tar.gz", [tar_member(f"f{i}") for i in range(50)])
    assert store_of(root, max_archive_entries=50).extract("ok.tar.gz", dest) == dest


def test_tar_declared_size_limit(root: Path, dest: Path) -> None:
    write_tar(
        root / "m.tar.gz", [tar_member("a", data=b"a" * 600), tar_member("b", data=b"b" * 600)]
    )
    assert_refused(
        store_of(root, max_archive_bytes=1000), "m.tar.gz", dest, "unpacked size exceeds the limit"
    )


def test_unreadable_archives(root: Path, dest: Path) -> None:
    (root / "m.mar").write_bytes(b"PK not really")
    (root / "m.tar.gz").write_bytes(b"\x1f\x8b garbage")
    assert_refused(store_of(root), "m.mar", dest, "not a readable zip file")
    assert_refused(store_of(root), "m.tar.gz", dest, "not a readable tar.gz file")


# -- zip rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([("../x", b"evil")], "member with a relative path (..)"),
        ([("a\\..\\..\\x", b"evil")], "member with a relative path (..)"),
        ([("/etc/x", b"evil")], "member with an absolute path"),
        ([("C:\\x", b"evil")], "member with an absolute path"),
        ([zip_symlink("root", "/")], "link pointing outside the archive"),
        ([zip_symlink("a/up", "../../x")], "link pointing outside the archive"),
    ],
)
def test_bad_zip_members(
    root: Path, dest: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], reason: str
) -> None:
    write_zip(root / "m.mar", entries)
    assert_refused(store_of(root), "m.mar", dest, reason)


def test_too_many_zip_entries(root: Path, dest: Path) -> None:
    write_zip(root / "m.mar", [(f"f{i}", b"") for i in range(51)])
    assert_refused(store_of(root, max_archive_entries=50), "m.mar", dest, "too many entries")


def test_zip_bomb_refused_before_writing(root: Path, dest: Path) -> None:
    write_zip(root / "m.mar", [("MAR-INF/MANIFEST.json", MANIFEST), ("bomb", b"\0" * 2_000_000)])
    assert (root / "m.mar").stat().st_size < 10_000
    assert_refused(
        store_of(root, max_archive_bytes=1_000_000),
        "m.mar",
        dest,
        "unpacked size exceeds the limit",
    )


def test_write_budget_stops_a_bomb_the_checks_missed(
    root: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes are counted while writing, whatever the declared sizes said."""
    write_zip(root / "m.mar", [("a", b"\0" * 600_000), ("b", b"\0" * 600_000)])
    monkeypatch.setattr(unpack, "check", lambda *args: None)
    with pytest.raises(InvalidModelException) as info:
        store_of(root, max_archive_bytes=1_000_000).extract("m.mar", dest)
    assert info.value.message == invalid("unpacked size exceeds the limit")
    assert list(dest.iterdir()) == []


def lie_about_size(path: Path, declared: int) -> None:
    """Rewrite every uncompressed-size field (local and central headers) to ``declared``."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = data.find(signature)
        while start != -1:
            data[start + offset : start + offset + 4] = struct.pack("<I", declared)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))


def test_zip_header_lying_about_size(root: Path, dest: Path) -> None:
    write_zip(root / "m.mar", [("big", os.urandom(50_000))])
    lie_about_size(root / "m.mar", 10)
    store = store_of(root, max_archive_bytes=1000)
    assert store.resolve("m.mar").manifest == {}  # the declared size is within the limit
    with pytest.raises(InvalidModelException) as info:
        store.extract("m.mar", dest)
    assert info.value.message == invalid("not a readable zip file")
    assert list(dest.iterdir()) == []


def test_zip_link_chain_escaping_is_caught_at_extraction(
    root: Path, dest: Path, tmp_path: Path
) -> None:
    # Each link alone looks contained; x -> . makes x/x/y land at the top, two levels short.
    write_zip(root / "m.mar", [zip_symlink("x", "."), zip_symlink("x/x/y", "../../escaped")])
    with pytest.raises(InvalidModelException) as info:
        store_of(root).extract("m.mar", dest)
    assert info.value.message == invalid("link pointing outside the archive")
    assert list(dest.iterdir()) == []


def test_zip_extract(root: Path, dest: Path) -> None:
    write_zip(
        root / "m.mar",
        [
            ("MAR-INF/MANIFEST.json", MANIFEST),
            ("lib/code.py", b"x = 1\n"),
            zip_symlink("alias.py", "lib/code.py"),
        ],
    )
    assert store_of(root).extract("m.mar", dest) == dest
    assert (dest / "MAR-INF" / "MANIFEST.json").read_bytes() == MANIFEST
    assert (dest / "alias.py").is_symlink() and (dest / "alias.py").read_bytes() == b"x = 1\n"


def test_duplicate_zip_members_are_refused_at_extraction(root: Path, dest: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_zip(root / "m.mar", [("a", b"1"), ("a", b"2")])
    with pytest.raises(InvalidModelException):
        store_of(root).extract("m.mar", dest)
    assert list(dest.iterdir()) == []


# -- directory archives ---------------------------------------------------------------


def test_directory_extract_copies_the_tree(root: Path, dest: Path) -> None:
    (root / "m" / "inner" / "MAR-INF").mkdir(parents=True)
    (root / "m" / "inner" / "MAR-INF" / "MANIFEST.json").write_bytes(MANIFEST)
    (root / "m" / "inner" / "h.py").write_text("pass\n")
    (root / "m" / "inner" / "alias.py").symlink_to("h.py")
    model = store_of(root).extract("m", dest)
    assert model == dest / "inner"
    assert os.readlink(model / "alias.py") == "h.py"
    assert (model / "h.py").read_text() == "pass\n"
    assert (root / "m" / "inner" / "h.py").exists()  # the store is untouched


@pytest.mark.parametrize("target", ["/etc/passwd", "../mEVIL/secret", "../../outside"])
def test_directory_links_out_are_refused(root: Path, dest: Path, target: str) -> None:
    (root / "mEVIL").mkdir()
    (root / "mEVIL" / "secret").write_text("s")
    (root / "m").mkdir()
    (root / "m" / "leak").symlink_to(target)
    assert_refused(store_of(root), "m", dest, "link pointing outside the archive")


def test_directory_manifest_link_out_is_refused(root: Path, dest: Path) -> None:
    (root / "secret.json").write_text("{}")
    (root / "m" / "MAR-INF").mkdir(parents=True)
    (root / "m" / "MAR-INF" / "MANIFEST.json").symlink_to(root / "secret.json")
    assert_refused(store_of(root), "m", dest, "link pointing outside the archive")


def test_containment_uses_real_paths_not_prefixes(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "mEVIL").mkdir()
    assert not unpack.is_within(str(tmp_path / "m"), str(tmp_path / "mEVIL" / "x"))
    assert unpack.is_within(str(tmp_path / "m"), str(tmp_path / "m" / "x"))
    (tmp_path / "m" / "link").symlink_to(tmp_path / "mEVIL")
    assert not unpack.is_within(str(tmp_path / "m"), str(tmp_path / "m" / "link" / "x"))


# -- extract preconditions ------------------------------------------------------------


def test_extract_needs_an_empty_destination(root: Path, dest: Path) -> None:
    write_zip(root / "m.mar", [("a", b"1")])
    (dest / "keep").write_text("mine")
    with pytest.raises(ValueError, match="empty destination"):
        store_of(root).extract("m.mar", dest)
    assert (dest / "keep").read_text() == "mine"


@pytest.mark.parametrize("name", ["../m.mar", "a/m.mar", "a\\m.mar", ""])
def test_extract_refuses_paths(root: Path, dest: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        store_of(root).extract(name, dest)
