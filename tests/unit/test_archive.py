"""ModelStore.resolve/remove: TorchServe's order and messages, URL policy, metadata."""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from control.archives.store import ArchiveInfo, Limits, ModelStore
from control.core.errors import (
    DownloadArchiveException,
    InternalServerException,
    InvalidModelException,
    ModelNotFoundException,
    ModelServerError,
)
from tests.support.archives import build_tgz, manifest

MANIFEST: dict[str, Any] = {
    "runtime": "python",
    "model": {"modelName": "noop", "modelVersion": "1.0", "handler": "handler.py"},
}


def mar_bytes(manifest: Any = MANIFEST, files: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        if manifest is not None:
            raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
            zf.writestr("MAR-INF/MANIFEST.json", raw)
        zf.writestr("handler.py", b"def handle(data, context):\n    return data\n")
        for name, data in (files or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


class Recorder:
    """A fetch stub: records calls, writes ``payload`` or raises ``error``."""

    def __init__(self, payload: bytes = b"", error: Exception | None = None) -> None:
        self.payload, self.error = payload, error
        self.calls: list[tuple[str, int]] = []

    def __call__(self, url: str, target: Path, limit: int) -> None:
        self.calls.append((url, limit))
        target.write_bytes(self.payload)
        if self.error is not None:
            raise self.error


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


def store_of(
    root: Path, allowed: tuple[str, ...] = (), fetch: Recorder | None = None
) -> ModelStore:
    return ModelStore(root, allowed, Limits(max_download_bytes=12345), fetch=fetch)


@contextmanager
def raises(exc_type: type[ModelServerError], message: str, status: int) -> Iterator[None]:
    """``pytest.raises`` for an exact class, message and HTTP status."""
    with pytest.raises(exc_type) as info:
        yield
    assert type(info.value) is exc_type
    assert info.value.message == message
    assert info.value.status == status


# -- order of checks ------------------------------------------------------------------


def test_store_not_configured_wins_over_everything() -> None:
    with raises(ModelNotFoundException, "Model store has not been configured.", 404):
        ModelStore(None, [".*"]).resolve("")


def test_empty_url(root: Path) -> None:
    with raises(ModelNotFoundException, "empty url", 404):
        store_of(root).resolve("")


@pytest.mark.parametrize(
    "url",
    [
        "../m.mar",
        "a/../m.mar",
        "..\\m.mar",
        "a\\..\\m.mar",
        "file:///store/../etc/m.mar",
        "http://h.example/a/%2e%2e/m.mar",
        "http://h.example/a/%2E%2E/m.mar",
        "http://h.example/a/%2E./m.mar",
        "http://h.example/a/.%2e/m.mar",
        "http://h.example/a/%252e%252e/m.mar",
        "http://h.example/a/%25252e%25252e/m.mar",
        "http://h.example/m.mar?x=..",
        # A basename that holds a separator once decoded:
        "http://h.example/a%2fm.mar",
        "http://h.example/a%5cm.mar",
        "http://h.example/a%252fm.mar",
        "http://h.example/a\\m.mar",
    ],
)
def test_relative_paths_refused_before_any_io(root: Path, url: str) -> None:
    fetch = Recorder(mar_bytes())
    with raises(ModelNotFoundException, f"Relative path is not allowed in url: {url}", 404):
        store_of(root, (".*",), fetch).resolve(url)
    assert fetch.calls == []
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example/m.mar",
        "HTTPS://evil.example/m.mar",
        "https://allowed.example.evil/m.mar",
        "ftp://allowed.example/m.mar",
        "s3://bucket/m.mar",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_url_not_allowed_does_no_io(root: Path, url: str) -> None:
    fetch = Recorder(mar_bytes())
    store = store_of(root, (r"https://allowed\.example/.*",), fetch)
    with raises(ModelNotFoundException, f"Given URL {url} does not match any allowed URL(s)", 404):
        store.resolve(url)
    assert fetch.calls == []
    assert list(root.iterdir()) == []


def test_default_allow_list_refuses_every_url(root: Path) -> None:
    with pytest.raises(ModelNotFoundException, match="does not match any allowed"):
        ModelStore(root, []).resolve("https://download.example/m.mar")
    assert list(root.iterdir()) == []


def test_allowed_urls_fully_match_case_insensitively(root: Path) -> None:
    fetch = Recorder(mar_bytes())
    store = store_of(root, (r"https://allowed\.example/models/.*",), fetch)
    info = store.resolve("HTTPS://ALLOWED.EXAMPLE/models/m.mar?sig=abc")
    assert info == ArchiveInfo("m.mar", True, MANIFEST, {})
    assert fetch.calls == [("HTTPS://ALLOWED.EXAMPLE/models/m.mar?sig=abc", 12345)]
    prefix_only = store_of(root, (r"https://allowed\.example",), fetch)
    with pytest.raises(ModelNotFoundException, match="does not match any allowed"):
        prefix_only.resolve("https://allowed.example/n.mar")


# -- downloads ------------------------------------------------------------------------


def test_download_lands_in_store_without_temp_files(root: Path) -> None:
    store = store_of(root, (r"https://h\.example/.*",), Recorder(mar_bytes()))
    info = store.resolve("https://h.example/a/b/m.mar")
    assert info.downloaded and info.archive == "m.mar"
    assert os.listdir(root) == ["m.mar"]
    assert (root / "m.mar").read_bytes() == mar_bytes()


def test_download_over_existing_file_is_refused_before_fetching(root: Path) -> None:
    (root / "m.mar").write_bytes(b"local")
    fetch = Recorder(mar_bytes())
    with raises(InternalServerException, "Model file already exists m.mar", 500):
        store_of(root, (".*",), fetch).resolve("https://h.example/m.mar")
    assert fetch.calls == []
    assert (root / "m.mar").read_bytes() == b"local"


@pytest.mark.parametrize("error", [OSError("reset"), ValueError("odd"), RuntimeError("x")])
def test_fetch_failure_leaves_no_partial_file(root: Path, error: Exception) -> None:
    url = "https://h.example/m.mar"
    fetch = Recorder(b"partial", error)
    with raises(DownloadArchiveException, f"Failed to download archive from: {url}", 400):
        store_of(root, (".*",), fetch).resolve(url)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("url", ["https://h/", "https://h", "https://h/.", "https://h/a%00.mar"])
def test_url_without_usable_file_name_is_a_download_failure(root: Path, url: str) -> None:
    fetch = Recorder(mar_bytes())
    with raises(DownloadArchiveException, f"Failed to download archive from: {url}", 400):
        store_of(root, (".*",), fetch).resolve(url)
    assert fetch.calls == []
    assert list(root.iterdir()) == []


def test_invalid_download_is_not_kept(root: Path) -> None:
    store = store_of(root, (".*",), Recorder(b"not a zip"))
    with raises(InvalidModelException, "Invalid model archive: not a readable zip file", 400):
        store.resolve("https://h.example/m.mar")
    assert list(root.iterdir()) == []


def test_concurrent_downloads_of_one_url_have_one_winner(root: Path) -> None:
    barrier = threading.Barrier(2, timeout=10)

    def fetch(url: str, target: Path, limit: int) -> None:
        barrier.wait()  # both registrations are past the "already exists" check
        target.write_bytes(mar_bytes())

    store = ModelStore(root, [".*"], fetch=fetch)
    results: list[object] = []

    def register() -> None:
        try:
            results.append(store.resolve("https://h.example/m.mar"))
        except ModelServerError as exc:
            results.append(exc)

    threads = [threading.Thread(target=register) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    wins = [r for r in results if isinstance(r, ArchiveInfo)]
    losses = [r for r in results if isinstance(r, InternalServerException)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].message == "Model file already exists m.mar"
    assert os.listdir(root) == ["m.mar"]


# -- local names ----------------------------------------------------------------------


def test_local_mar(root: Path) -> None:
    (root / "m.mar").write_bytes(mar_bytes())
    assert store_of(root).resolve("m.mar") == ArchiveInfo("m.mar", False, MANIFEST, {})


def test_local_tgz_root_is_its_single_directory(root: Path) -> None:
    build_tgz(root / "m.tar.gz", "m", "2.0")
    assert store_of(root).resolve("m.tar.gz").manifest == manifest("m", "2.0")


def test_any_other_file_name_is_read_as_tar_gz(root: Path) -> None:
    (root / "m.zip").write_bytes(mar_bytes())
    with raises(InvalidModelException, "Invalid model archive: not a readable tar.gz file", 400):
        store_of(root).resolve("m.zip")


def test_local_path_components_are_dropped(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.mar").write_bytes(mar_bytes())
    (root / "m.mar").write_bytes(mar_bytes())
    assert store_of(root).resolve("/some/where/m.mar").archive == "m.mar"
    with raises(ModelNotFoundException, f"Model not found at: {outside / 'x.mar'}", 404):
        store_of(root).resolve(str(outside / "x.mar"))


@pytest.mark.parametrize(
    "url", ["missing.mar", "dir/", ".", "m\x00.mar", ".mqserve-download-x.part"]
)
def test_model_not_found(root: Path, url: str) -> None:
    (root / ".mqserve-download-x.part").write_bytes(mar_bytes())
    with raises(ModelNotFoundException, f"Model not found at: {url}", 404):
        store_of(root).resolve(url)


def test_directory_archive(root: Path) -> None:
    (root / "m" / "MAR-INF").mkdir(parents=True)
    (root / "m" / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(MANIFEST))
    (root / "m" / "sub").mkdir()
    assert store_of(root).resolve("m") == ArchiveInfo("m", False, MANIFEST, {})


def test_directory_with_one_subdirectory_uses_it(root: Path) -> None:
    (root / "m" / "inner" / "MAR-INF").mkdir(parents=True)
    (root / "m" / "inner" / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(MANIFEST))
    assert store_of(root).resolve("m").manifest == MANIFEST
    (root / "m" / "README").write_text("a file beside the sub-directory")
    assert store_of(root).resolve("m").manifest == {}


def test_missing_manifest_is_allowed(root: Path) -> None:
    (root / "m.mar").write_bytes(mar_bytes(manifest=None))
    assert store_of(root).resolve("m.mar") == ArchiveInfo("m.mar", False, {}, {})


# -- manifest and model-config.yaml ---------------------------------------------------

BAD_MANIFESTS = [
    (b"{not json", "Invalid model archive: MANIFEST.json is not valid JSON"),
    (b"\xff\xfe", "Invalid model archive: MANIFEST.json is not valid JSON"),
    ([1, 2], "Invalid model archive: MANIFEST.json is not a JSON object"),
    ({"model": "noop"}, "Invalid model archive: MANIFEST.json model is not an object"),
    ({"runtime": "java"}, "Runtime is not defined or invalid."),
    ({"runtime": None}, "Runtime is not defined or invalid."),
] + [
    ({"model": {key: 1}}, f"Invalid model archive: MANIFEST.json model.{key} is not a string")
    for key in (
        "modelName",
        "modelVersion",
        "handler",
        "serializedFile",
        "modelFile",
        "configFile",
        "requirementsFile",
    )
]


@pytest.mark.parametrize(("manifest", "message"), BAD_MANIFESTS)
def test_bad_manifests(root: Path, manifest: Any, message: str) -> None:
    (root / "m.mar").write_bytes(mar_bytes(manifest))
    with raises(InvalidModelException, message, 400):
        store_of(root).resolve("m.mar")


@pytest.mark.parametrize("runtime", ["python", "python3", "LSP"])
def test_valid_runtimes(root: Path, runtime: str) -> None:
    (root / "m.mar").write_bytes(mar_bytes({"runtime": runtime, "model": {}}))
    assert store_of(root).resolve("m.mar").manifest["runtime"] == runtime


def with_config(root: Path, text: bytes | None, config_file: str = "model-config.yaml") -> None:
    manifest = {"model": {"modelName": "m", "configFile": config_file}}
    files = {} if text is None else {"model-config.yaml": text}
    (root / "m.mar").write_bytes(mar_bytes(manifest, files))


@pytest.mark.parametrize(
    ("text", "expected"),
    [(b"minWorkers: 2\nhandler:\n  k: v\n", {"minWorkers": 2, "handler": {"k": "v"}}), (b"", {})],
)
def test_model_config_parsed(root: Path, text: bytes, expected: dict[str, Any]) -> None:
    with_config(root, text)
    assert store_of(root).resolve("m.mar").model_config == expected


def test_config_file_is_read_by_basename(root: Path) -> None:
    with_config(root, b"batchSize: 4\n", config_file="conf/model-config.yaml")
    assert store_of(root).resolve("m.mar").model_config == {"batchSize": 4}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"- a\n- b\n", "is not a mapping"),
        (b"just text\n", "is not a mapping"),
        (b"a: [1, 2\n", "is not valid YAML"),
        (None, "named in the manifest is missing"),
    ],
)
def test_bad_model_config(root: Path, text: bytes | None, reason: str) -> None:
    with_config(root, text)
    with raises(InvalidModelException, f"Invalid model archive: model-config.yaml {reason}", 400):
        store_of(root).resolve("m.mar")


def test_yaml_python_tags_do_not_execute(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {marker}']\n".encode()
    with_config(root, b"minWorkers: 1\nx: " + payload)
    with raises(
        InvalidModelException, "Invalid model archive: model-config.yaml is not valid YAML", 400
    ):
        store_of(root).resolve("m.mar")
    assert not marker.exists()


# -- remove ---------------------------------------------------------------------------


def test_remove_deletes_downloaded_archive(root: Path) -> None:
    store = store_of(root, (".*",), Recorder(mar_bytes()))
    info = store.resolve("https://h.example/m.mar")
    store.remove(info.archive)
    assert list(root.iterdir()) == []
    store.remove(info)  # missing: no error
    # The same URL can be registered again once the file is gone.
    assert store.resolve("https://h.example/m.mar").downloaded


@pytest.mark.parametrize("name", ["a/m.mar", "a\\m.mar", "..", "../m.mar", "", "."])
def test_remove_refuses_paths(root: Path, name: str) -> None:
    (root / "m.mar").write_bytes(b"x")
    with pytest.raises(ValueError, match="plain file name"):
        store_of(root).remove(name)
    assert (root / "m.mar").exists()


def test_remove_refuses_directories(root: Path) -> None:
    (root / "m").mkdir()
    with pytest.raises(ValueError, match="not directories"):
        store_of(root).remove("m")
    assert (root / "m").is_dir()
