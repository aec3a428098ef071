"""Remote archive URLs: the allow-list policy and the default fetcher.

The policy helpers (:func:`has_relative_path`, :func:`matches_allowed`) run before any
I/O. :func:`fetch_url` downloads one allowed URL into a file with a byte limit:

* ``http``/``https`` through urllib3, one connection per hop, pinned to the address the
  host name resolved to (no second DNS lookup to rebind). Redirects are followed by hand,
  at most :data:`MAX_REDIRECTS`, and every ``Location`` must itself pass the allow-list.
* ``file://`` copies a local regular file.

Hosts resolving to link-local (cloud metadata, ``169.254.169.254``), multicast or
unspecified addresses are refused even when a pattern allows them. Loopback and
private addresses are allowed only because a pattern names them explicitly; the
default allow-list is empty.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

import urllib3

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
CHUNK = 64 * 1024

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DECODE_ROUNDS = 4


class DownloadError(Exception):
    """A fetch failed; the message is for logs, never for clients."""


def decodings(text: str) -> list[str]:
    """``text`` and its successive percent-decodings, until stable or four deep."""
    versions = [text]
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote(versions[-1])
        if decoded == versions[-1]:
            break
        versions.append(decoded)
    return versions


def has_relative_path(url: str) -> bool:
    """True when ``url`` holds ``..``, also after percent-decoding (up to four rounds).

    A URL that still decodes differently after four rounds is refused too.
    """
    versions = decodings(url)
    if unquote(versions[-1]) != versions[-1]:
        return True
    return any(".." in text for text in versions)


def matches_allowed(url: str, patterns: Sequence[str]) -> bool:
    """True when ``url`` fully matches one of ``patterns``, case-insensitively."""
    return any(re.fullmatch(pattern, url, re.IGNORECASE) for pattern in patterns)


def fetch_url(url: str, target: Path, limit: int, allowed: Sequence[str]) -> None:
    """Download ``url`` into ``target`` (overwritten), aborting past ``limit`` bytes.

    Raises :class:`DownloadError` on any failure; the caller deletes ``target``.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        _copy_local(url, target, limit)
    elif scheme in ("http", "https"):
        _fetch_http(url, target, limit, allowed)
    else:
        raise DownloadError(f"unsupported scheme {scheme!r}")


# -- file:// --------------------------------------------------------------------------


def _copy_local(url: str, target: Path, limit: int) -> None:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError("file URLs must name a local file")
    source = unquote(parts.path)
    try:
        with open(source, "rb") as src:
            info = os.fstat(src.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DownloadError("not a regular file")
            if info.st_size > limit:
                raise DownloadError("file larger than the download limit")
            with target.open("wb") as dst:
                _copy_limited(iter(lambda: src.read(CHUNK), b""), dst, limit)
    except OSError as exc:
        raise DownloadError(f"cannot read local file: {exc.strerror}") from exc


# -- http(s) --------------------------------------------------------------------------


def _fetch_http(url: str, target: Path, limit: int, allowed: Sequence[str]) -> None:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        with _pool(current) as pool:
            response = _get(pool, current)
            try:
                if response.status in _REDIRECTS:
                    current = _next_hop(current, response.headers.get("Location"), allowed)
                    continue
                if not 200 <= response.status < 300:
                    raise DownloadError(f"HTTP status {response.status}")
                _save(response, target, limit)
                return
            finally:
                response.close()
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects")


def _next_hop(current: str, location: str | None, allowed: Sequence[str]) -> str:
    if not location:
        raise DownloadError("redirect without Location")
    nxt = urljoin(current, location)
    if urlsplit(nxt).scheme.lower() not in ("http", "https"):
        raise DownloadError("redirect to a non-http URL")
    if has_relative_path(nxt) or not matches_allowed(nxt, allowed):
        raise DownloadError("redirect to a URL that is not allowed")
    return nxt


def _pool(url: str) -> urllib3.HTTPConnectionPool:
    """A one-off connection pool pinned to the checked address of ``url``'s host."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise DownloadError("URL without host")
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    address = resolve_public(host, port)
    timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)
    if https:
        return urllib3.HTTPSConnectionPool(
            address, port, timeout=timeout, server_hostname=host, assert_hostname=host
        )
    return urllib3.HTTPConnectionPool(address, port, timeout=timeout)


def _get(pool: urllib3.HTTPConnectionPool, url: str) -> urllib3.BaseHTTPResponse:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    host_header = parts.netloc.rpartition("@")[2]
    try:
        return pool.urlopen(
            "GET",
            path,
            headers={"Host": host_header, "User-Agent": "mqserve"},
            redirect=False,
            retries=False,
            preload_content=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        raise DownloadError(f"request failed: {type(exc).__name__}") from exc


def resolve_public(host: str, port: int) -> str:
    """The first address of ``host``; refuses link-local, multicast, unspecified ones.

    Every address the name resolves to is checked, so a name cannot hide a metadata
    address behind a harmless first answer.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise DownloadError("host does not resolve") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise DownloadError("host does not resolve")
    for text in addresses:
        if is_forbidden_address(text):
            raise DownloadError("host resolves to a forbidden address")
    return addresses[0]


def is_forbidden_address(text: str) -> bool:
    """True for link-local, multicast and unspecified addresses (IPv4-mapped included)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address.is_multicast or address.is_unspecified


def _save(response: urllib3.BaseHTTPResponse, target: Path, limit: int) -> None:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise DownloadError("Content-Length above the download limit")
    try:
        with target.open("wb") as dst:
            _copy_limited(response.stream(CHUNK), dst, limit)
    except urllib3.exceptions.HTTPError as exc:
        raise DownloadError(f"transfer failed: {type(exc).__name__}") from exc


def _copy_limited(chunks: Iterable[bytes], dst: BinaryIO, limit: int) -> None:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise DownloadError("download larger than the limit")
        dst.write(chunk)
