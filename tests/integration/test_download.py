"""Downloads through the default fetcher against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from control.archives.store import Limits, ModelStore
from control.core.errors import DownloadArchiveException
from tests.support.archives import build_mar


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: False: no Content-Length, the body ends when the connection closes.
    length: bool = True


class Server:
    """A local HTTP server with fixed routes that records every request path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                route = server.routes.get(self.path, Route(404, b"not found"))
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.allowed = rf"http://127\.0\.0\.1:{self._httpd.server_address[1]}/.*"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as running:
        yield running


@pytest.fixture
def other_server() -> Iterator[Server]:
    with Server() as running:
        yield running


@pytest.fixture
def mar(tmp_path: Path) -> bytes:
    return build_mar(tmp_path / "m.mar", "m").read_bytes()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


def store_for(root: Path, server: Server, limit: int = 4 * 1024**3) -> ModelStore:
    return ModelStore(root, [server.allowed], Limits(max_download_bytes=limit))


def assert_download_fails(store: ModelStore, url: str) -> None:
    with pytest.raises(DownloadArchiveException) as info:
        store.resolve(url)
    assert info.value.message == f"Failed to download archive from: {url}"
    assert info.value.status == 400


def test_download_of_a_mar(root: Path, server: Server, mar: bytes) -> None:
    server.routes["/models/m.mar"] = Route(body=mar)
    info = store_for(root, server).resolve(f"{server.base}/models/m.mar")
    assert info.downloaded and info.archive == "m.mar"
    assert info.manifest["model"]["modelName"] == "m"
    assert (root / "m.mar").read_bytes() == mar
    assert [p.name for p in root.iterdir()] == ["m.mar"]
    assert server.hits == ["/models/m.mar"]


def test_redirect_within_the_allow_list_is_followed(root: Path, server: Server, mar: bytes) -> None:
    server.routes["/hop.mar"] = Route(302, headers={"Location": "/m.mar"})
    server.routes["/m.mar"] = Route(body=mar)
    assert store_for(root, server).resolve(f"{server.base}/hop.mar").archive == "hop.mar"
    assert (root / "hop.mar").read_bytes() == mar
    assert server.hits == ["/hop.mar", "/m.mar"]


def test_redirect_to_a_url_not_allowed_is_refused(
    root: Path, server: Server, other_server: Server, mar: bytes
) -> None:
    other_server.routes["/m.mar"] = Route(body=mar)
    server.routes["/r.mar"] = Route(302, headers={"Location": f"{other_server.base}/m.mar"})
    assert_download_fails(store_for(root, server), f"{server.base}/r.mar")
    assert server.hits == ["/r.mar"]
    assert other_server.hits == []
    assert list(root.iterdir()) == []


def test_redirect_loop_stops_after_five_hops(root: Path, server: Server) -> None:
    server.routes["/loop.mar"] = Route(302, headers={"Location": "/loop.mar"})
    assert_download_fails(store_for(root, server), f"{server.base}/loop.mar")
    assert server.hits == ["/loop.mar"] * 6
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "close-delimited"])
def test_oversize_download_leaves_no_partial_file(root: Path, server: Server, length: bool) -> None:
    server.routes["/big.mar"] = Route(body=b"x" * 50_000, length=length)
    assert_download_fails(store_for(root, server, limit=10_000), f"{server.base}/big.mar")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("status", [304, 404, 500])
def test_non_2xx_is_a_download_failure(root: Path, server: Server, status: int) -> None:
    server.routes["/m.mar"] = Route(status, b"nope")
    assert_download_fails(store_for(root, server), f"{server.base}/m.mar")
    assert list(root.iterdir()) == []


def test_missing_archive_is_a_download_failure(root: Path, server: Server) -> None:
    assert_download_fails(store_for(root, server), f"{server.base}/missing.mar")
    assert server.hits == ["/missing.mar"]
    assert list(root.iterdir()) == []
