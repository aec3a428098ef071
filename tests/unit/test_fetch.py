"""The URL policy helpers and the default fetcher, without any network."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.archives import download
from control.archives.download import (
    DownloadError,
    fetch_url,
    has_relative_path,
    is_forbidden_address,
    matches_allowed,
    resolve_public,
)
from control.archives.store import ModelStore
from control.core.errors import DownloadArchiveException
from tests.support.archives import build_mar


@pytest.mark.parametrize(
    ("url", "relative"),
    [
        ("m.mar", False),
        ("http://h/a/m.mar", False),
        ("http://h/a%20b.mar", False),
        ("..", True),
        ("a\\..\\b", True),
        ("%2e%2e/x", True),
        ("%2E./x", True),
        (".%2e/x", True),
        ("%252e%252e/x", True),
        ("%25252E%25252E/x", True),
        ("%2525252525252e%2e", True),  # still decoding after four rounds: refused
    ],
)
def test_has_relative_path(url: str, relative: bool) -> None:
    assert has_relative_path(url) is relative


def test_matches_allowed_is_a_case_insensitive_full_match() -> None:
    patterns = [r"https://models\.example/.*", r"file:///srv/models/[a-z]+\.mar"]
    assert matches_allowed("HTTPS://Models.Example/x.mar", patterns)
    assert matches_allowed("file:///srv/models/abc.mar", patterns)
    assert not matches_allowed("file:///srv/models/abc.mar.evil", patterns)
    assert not matches_allowed("http://models.example/x.mar", patterns)
    assert not matches_allowed("https://models.example/x.mar", [])


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("169.254.169.254", True),
        ("169.254.0.1", True),
        ("fe80::1", True),
        ("fe80::1%eth0", True),
        ("224.0.0.1", True),
        ("ff02::1", True),
        ("0.0.0.0", True),
        ("::", True),
        ("::ffff:169.254.169.254", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("::1", False),
        ("93.184.216.34", False),
    ],
)
def test_forbidden_addresses(address: str, forbidden: bool) -> None:
    assert is_forbidden_address(address) is forbidden


def test_metadata_address_is_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="forbidden address"):
        resolve_public("169.254.169.254", 80)
    with pytest.raises(DownloadError, match="forbidden address"):
        fetch_url("http://169.254.169.254/latest/m.mar", tmp_path / "t", 100, [".*"])
    assert resolve_public("127.0.0.1", 80) == "127.0.0.1"


def test_unsupported_schemes(tmp_path: Path) -> None:
    for url in ("ftp://h/m.mar", "s3://bucket/m.mar"):
        with pytest.raises(DownloadError, match="unsupported scheme"):
            fetch_url(url, tmp_path / "t", 100, [".*"])


@pytest.mark.parametrize(
    ("location", "allowed"),
    [
        ("http://evil.example/m.mar", [r"http://good\.example/.*"]),
        ("file:///etc/passwd", [".*"]),
        ("/x/%2e%2e/m.mar", [".*"]),
        (None, [".*"]),
    ],
)
def test_redirect_targets_are_revalidated(location: str | None, allowed: list[str]) -> None:
    with pytest.raises(DownloadError, match="redirect"):
        download._next_hop("http://good.example/a", location, allowed)


def test_relative_redirect_is_joined() -> None:
    allowed = [r"http://good\.example/.*"]
    hop = download._next_hop("http://good.example/a/b", "/c.mar", allowed)
    assert hop == "http://good.example/c.mar"


# -- file:// --------------------------------------------------------------------------


def test_file_url_copies_a_local_file(tmp_path: Path) -> None:
    source = tmp_path / "src.mar"
    source.write_bytes(b"archive")
    fetch_url(f"file://{source}", tmp_path / "t", 100, [])
    assert (tmp_path / "t").read_bytes() == b"archive"


def test_file_url_limits(tmp_path: Path) -> None:
    source = tmp_path / "src.mar"
    source.write_bytes(b"x" * 101)
    cases = {
        f"file://{source}": "larger than the download limit",
        f"file://{tmp_path}": "not a regular file|cannot read",
        f"file://{tmp_path / 'missing.mar'}": "cannot read",
        f"file://otherhost{source}": "local file",
    }
    for url, message in cases.items():
        with pytest.raises(DownloadError, match=message):
            fetch_url(url, tmp_path / "t", 100, [])


def test_store_binds_allowed_urls_to_the_default_fetcher(tmp_path: Path) -> None:
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    source = build_mar(source_dir / "m.mar", "m")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = ModelStore(store_dir, [f"file://{source_dir}/.*"])
    info = store.resolve(f"file://{source_dir}/m.mar")
    assert info.downloaded and (store_dir / "m.mar").read_bytes() == source.read_bytes()
    with pytest.raises(DownloadArchiveException):
        store.resolve(f"file://{source_dir}/absent.mar")
    assert sorted(p.name for p in store_dir.iterdir()) == ["m.mar"]
