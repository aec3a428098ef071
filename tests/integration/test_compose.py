"""The docker-compose stack in ``infra/``, checked without a Docker engine.

Every compose file is validated against the Compose Specification's JSON schema
(``check-jsonschema --builtin-schema vendor.compose-spec``, offline), alone and merged
with the files it overrides. The security and operations defaults the stack promises
(docs/compose.md) are asserted on the parsed YAML: what is published and where, the
Redis password, least privilege, health checks, drain time, GPU reservations.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.core.settings import Settings, apply_properties, read_properties
from workers.supervisor.run import SHUTDOWN_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MAIN = "docker-compose.yml"
CPU = "docker-compose.cpu.yml"
WORKER_HOST = "docker-compose.worker-host.yml"
EXPOSE_REDIS = "docker-compose.expose-redis.yml"
COMPOSE_FILES = (MAIN, CPU, WORKER_HOST, EXPOSE_REDIS)
#: Each supported combination of ``-f`` files, in the order they are given.
STACKS = (
    (MAIN,),
    (MAIN, CPU),
    (MAIN, EXPOSE_REDIS),
    (MAIN, CPU, EXPOSE_REDIS),
    (WORKER_HOST,),
    (WORKER_HOST, CPU),
)
MQSERVE_SERVICES = ("api", "supervisor")
CONFIG = "/etc/mqserve/config.properties"
#: The only paths an mqserve container may write, besides tmpfs /tmp.
WRITABLE = {
    "api": {"/models", "/var/lib/mqserve"},
    "supervisor": {"/var/lib/mqserve", "/var/tmp/mqserve"},
}
#: Drain time of a stopping supervisor plus a margin: what stop_grace_period must cover.
MIN_GRACE_S = 150.0


# -- loading and merging, as docker compose does for these files --------------------


class Reset:
    """Compose's ``!reset`` tag: this key's value replaces, not merges with, the base."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus the tags Compose defines for merging files."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node, deep=True))
    return Reset(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _reset)


def load(name: str) -> dict[str, Any]:
    with (INFRA / name).open() as fh:
        data = yaml.load(fh, Loader=ComposeLoader)
    assert isinstance(data, dict)
    return data


def plain(value: Any) -> Any:
    """``value`` with Compose tags resolved to what they leave behind (for JSON)."""
    if isinstance(value, Reset):
        return plain(value.value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items() if not _removed(item)}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def _removed(value: Any) -> bool:
    return isinstance(value, Reset) and value.value in (None, "")


def merge(base: Any, override: Any) -> Any:
    """Compose's merge, as far as these files need it: mappings merge key by key,
    ``ports`` and other sequences append unless ``!reset``, scalars replace."""
    if isinstance(override, Reset):
        return override
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def stack(*names: str) -> dict[str, Any]:
    merged: Any = {}
    for name in names:
        merged = merge(merged, load(name))
    result = plain(merged)
    assert isinstance(result, dict)
    return result


def check_jsonschema(*instances: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         *map(str, instances)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def seconds(duration: str) -> float:
    """A Compose duration (``150s``, ``2m30s``, ``1h``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def mount(volume: str) -> tuple[str, str, str]:
    """``(source, target, mode)`` of a short-syntax volume; the source may be ``${...}``."""
    match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(ro|rw))?", volume)
    assert match, volume
    return match[1], match[2], match[3] or "rw"


def variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))


# -- the Compose Specification -------------------------------------------------------


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_each_file_is_valid_against_the_compose_spec(name: str, tmp_path: Path) -> None:
    path = INFRA / name
    if "!reset" in path.read_text() or "!override" in path.read_text():
        # check-jsonschema's YAML parser does not know Compose's merge tags.
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(plain(load(name))))
    result = check_jsonschema(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("names", STACKS, ids="+".join)
def test_each_merged_stack_is_valid_against_the_compose_spec(
    names: tuple[str, ...], tmp_path: Path
) -> None:
    path = tmp_path / "merged.json"
    path.write_text(json.dumps(stack(*names)))
    result = check_jsonschema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = stack(MAIN)
    del broken["services"]["supervisor"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = check_jsonschema(path)
    assert result.returncode == 1
    assert "capabilities" in result.stdout + result.stderr


# -- what is exposed -------------------------------------------------------------------


def test_redis_is_not_published_and_needs_a_password_without_default() -> None:
    redis = stack(MAIN)["services"]["redis"]
    assert "ports" not in redis
    assert "network_mode" not in redis
    command = redis["command"]
    password = command[command.index("--requirepass") + 1]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", password), password
    for flag, value in [
        ("--appendonly", "yes"),
        ("--maxmemory-policy", "noeviction"),
        ("--protected-mode", "yes"),
    ]:
        assert command[command.index(flag) + 1] == value
    # The health check authenticates through the environment, not the command line.
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert "REDIS_PASSWORD" not in json.dumps(redis["healthcheck"])
    assert "redis-cli" in json.dumps(redis["healthcheck"]["test"])
    assert "redis-data:/data" in redis["volumes"]


def test_every_redis_url_carries_the_password() -> None:
    services = stack(MAIN)["services"]
    for name in MQSERVE_SERVICES:
        url = services[name]["environment"]["MQSERVE_REDIS_URL"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]+\}@redis:6379/0", url), url


def test_api_ports_are_published_on_loopback_by_default() -> None:
    api = stack(MAIN)["services"]["api"]
    published = {}
    for entry in api["ports"]:
        assert isinstance(entry, str)
        address, _, rest = entry.partition("}:")
        assert address + "}" == "${MQSERVE_PUBLISH_ADDRESS:-127.0.0.1}", entry
        published[int(rest.rsplit(":", 1)[1])] = entry
    assert sorted(published) == [7070, 7071, 8080, 8081, 8082]  # gRPC, then HTTP
    for name, service in stack(MAIN)["services"].items():
        if name != "api":
            assert "ports" not in service, name


def test_exposing_redis_is_opt_in_and_has_no_default_address() -> None:
    (binding,) = load(EXPOSE_REDIS)["services"]["redis"]["ports"]
    assert re.match(r"\$\{MQSERVE_REDIS_BIND_ADDRESS:\?[^}]+\}:", binding), binding
    assert "0.0.0.0" not in binding
    assert stack(MAIN, EXPOSE_REDIS)["services"]["redis"]["ports"] == [binding]


# -- least privilege -------------------------------------------------------------------


def mqserve_services() -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for names in STACKS:
        for name, service in stack(*names)["services"].items():
            if name in MQSERVE_SERVICES:
                found.append(("+".join(names), name, service))
    return found


@pytest.mark.parametrize(("files", "name", "service"), mqserve_services())
def test_mqserve_services_run_with_least_privilege(
    files: str, name: str, service: dict[str, Any]
) -> None:
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "cap_add" not in service
    assert "no-new-privileges:true" in service["security_opt"]
    assert service.get("privileged", False) is False
    assert "/tmp" in service["tmpfs"]
    # No user override: the image's unprivileged user (uid 10001) applies.
    assert service.get("user", "10001") not in ("0", "root", "0:0", "root:root")
    assert not any("docker.sock" in str(volume) for volume in service["volumes"])
    for volume in service["volumes"]:
        _, target, mode = mount(volume)
        if mode != "ro":
            assert target in WRITABLE[name], volume


def test_the_image_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    for _, _, service in mqserve_services():
        assert "user" not in service


def test_the_model_store_is_writable_by_the_api_and_read_only_for_supervisors() -> None:
    services = stack(MAIN)["services"]
    assert "${MQSERVE_MODEL_STORE:-model-store}:/models" in services["api"]["volumes"]
    assert "${MQSERVE_MODEL_STORE:-model-store}:/models:ro" in services["supervisor"]["volumes"]
    assert "api-home:/var/lib/mqserve" in services["api"]["volumes"]
    assert services["api"]["environment"]["MQSERVE_HOME"] == "/var/lib/mqserve"
    (store,) = [
        v for v in stack(WORKER_HOST)["services"]["supervisor"]["volumes"] if "/models" in v
    ]
    assert store.startswith("${MQSERVE_MODEL_STORE:?") and store.endswith(":/models:ro")


# -- health, restarts, shutdown --------------------------------------------------------


@pytest.mark.parametrize("names", STACKS, ids="+".join)
def test_every_service_has_a_health_check_and_a_restart_policy(names: tuple[str, ...]) -> None:
    for name, service in stack(*names)["services"].items():
        assert service["restart"] in ("always", "unless-stopped", "on-failure"), name
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        seconds(service["healthcheck"]["interval"])
        seconds(service["healthcheck"]["start_period"])


def test_mqserve_health_checks_call_the_check_mode_of_the_same_command() -> None:
    for names in STACKS:
        for name, service in stack(*names)["services"].items():
            if name not in MQSERVE_SERVICES:
                continue
            command, test = service["command"], service["healthcheck"]["test"]
            assert test[:3] == ["CMD", "mqserve", command[0]], (names, name)
            assert test[3] == "--check"
            # The probe sees the same config and, for a supervisor, the same host name.
            assert test[4:] == command[1:], (names, name)


def test_commands_are_the_documented_entrypoints() -> None:
    services = stack(MAIN)["services"]
    assert services["api"]["command"] == ["api", "--ts-config", CONFIG]
    assert services["supervisor"]["command"] == [
        "supervisor", "--ts-config", CONFIG, "--host-name", "${MQSERVE_HOST_NAME:-supervisor-1}",
    ]  # fmt: skip
    worker = stack(WORKER_HOST)["services"]["supervisor"]["command"]
    assert worker[:4] == ["supervisor", "--ts-config", CONFIG, "--host-name"]
    assert worker[4].startswith("${MQSERVE_HOST_NAME:?"), "worker hosts must name themselves"
    for names in STACKS:
        for name, service in stack(*names)["services"].items():
            if name in MQSERVE_SERVICES:
                assert service["init"] is True, (names, name)
                assert f"./config.properties:{CONFIG}:ro" in service["volumes"]
            if name == "supervisor":
                # Archives unpack and kernels compile on the scratch volume: /tmp is noexec.
                environment = service["environment"]
                for variable in ("TMPDIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
                    assert environment[variable].startswith("/var/tmp/mqserve"), variable
                assert "worker-scratch:/var/tmp/mqserve" in service["volumes"]


def test_mqserve_waits_for_a_healthy_redis() -> None:
    services = stack(MAIN)["services"]
    for name in MQSERVE_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("names", STACKS, ids="+".join)
def test_supervisors_get_time_to_drain_their_workers(names: tuple[str, ...]) -> None:
    services = stack(*names)["services"]
    grace = seconds(services["supervisor"]["stop_grace_period"])
    assert grace >= MIN_GRACE_S
    assert grace >= SHUTDOWN_TIMEOUT + 10
    if "api" in services:
        assert seconds(services["api"]["stop_grace_period"]) >= MIN_GRACE_S


# -- GPUs --------------------------------------------------------------------------------


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return list(devices.get("devices", []))


@pytest.mark.parametrize("names", [(MAIN,), (WORKER_HOST,)], ids="+".join)
def test_gpu_files_reserve_nvidia_gpus_for_the_supervisor(names: tuple[str, ...]) -> None:
    services = stack(*names)["services"]
    (device,) = gpu_devices(services["supervisor"])
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == "all"
    assert "CUDA_VISIBLE_DEVICES" not in services["supervisor"]["environment"]
    for name, service in services.items():
        if name != "supervisor":
            assert not gpu_devices(service), name


@pytest.mark.parametrize("names", [(MAIN, CPU), (WORKER_HOST, CPU)], ids="+".join)
def test_the_cpu_override_removes_the_gpu_reservation(names: tuple[str, ...]) -> None:
    services = stack(*names)["services"]
    for name, service in services.items():
        assert not gpu_devices(service), name
    assert services["supervisor"]["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    # Everything else of the base file survives the override.
    base = stack(names[0])["services"]["supervisor"]
    for key in ("command", "volumes", "healthcheck", "stop_grace_period", "read_only"):
        assert services["supervisor"][key] == base[key]


def test_the_cpu_override_only_touches_the_supervisor() -> None:
    # So it applies to the worker-host file too, which has no api or redis.
    assert set(load(CPU)["services"]) == {"supervisor"}


# -- configuration and documentation ---------------------------------------------------


def test_the_shipped_config_is_valid_and_listens_inside_the_container() -> None:
    settings = apply_properties(Settings(), read_properties(INFRA / "config.properties"))
    assert settings.bind("inference") == ("0.0.0.0", 8080)
    assert settings.bind("management") == ("0.0.0.0", 8081)
    assert settings.bind("metrics") == ("0.0.0.0", 8082)
    assert settings.model_store == Path("/models")
    assert settings.enable_model_api
    assert settings.token_auth
    assert settings.default_workers_per_model == 1
    assert settings.allowed_urls == ()
    assert settings.default_response_timeout + 10 <= MIN_GRACE_S


def test_every_variable_is_documented_in_the_env_example_and_the_docs() -> None:
    used: set[str] = set()
    for name in COMPOSE_FILES:
        used |= variables((INFRA / name).read_text())
    example = (INFRA / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    assert used <= documented, used - documented
    docs = (ROOT / "docs" / "compose.md").read_text()
    for variable in sorted(used):
        assert f"`{variable}`" in docs, variable


def test_the_env_example_sets_no_password() -> None:
    example = (INFRA / ".env.example").read_text()
    assert re.search(r"^REDIS_PASSWORD=$", example, re.MULTILINE)
    assert (INFRA / ".gitignore").read_text().split() == [".env"]
