"""``mqserve`` flag and config-file precedence, without starting any process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from control import cli
from control.core.settings import DEFAULT_MAX_REQUEST_SIZE, Settings
from control.stack import launcher


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("MQSERVE_HOME", str(path))
    monkeypatch.delenv("TS_CONFIG_FILE", raising=False)
    monkeypatch.delenv("MQSERVE_REDIS_URL", raising=False)
    return path


@pytest.fixture
def started(home: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, bool]]:
    calls: list[tuple[Settings, bool]] = []

    def fake_start(settings: Settings, foreground: bool) -> int:
        calls.append((settings, foreground))
        return 0

    monkeypatch.setattr(launcher, "start", fake_start)
    return calls


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.cli, list(args), prog_name="mqserve")


def start_ok(started: list[tuple[Settings, bool]], *args: str) -> Settings:
    result = invoke("start", *args)
    assert result.exit_code == 0, result.output
    assert len(started) == 1
    return started[0][0]


def write_config(path: Path, **values: Any) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def test_defaults_bind_loopback_and_use_the_home_from_env(
    started: list[tuple[Settings, bool]], home: Path
) -> None:
    settings = start_ok(started)
    assert settings == Settings(home=home)
    assert settings.bind("management") == ("127.0.0.1", 8081)
    assert settings.bind("inference") == ("127.0.0.1", 8080)
    assert settings.redis_url is None
    assert settings.token_auth
    assert started[0][1] is False


def test_home_defaults_to_dot_mqserve(
    started: list[tuple[Settings, bool]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MQSERVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert start_ok(started).home == tmp_path / ".mqserve"


def test_every_supported_config_key_is_read(
    started: list[tuple[Settings, bool]], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    config = write_config(
        tmp_path / "config.properties",
        inference_address="http://127.0.0.1:9080",
        management_address="http://0.0.0.0:9081",
        metrics_address="http://127.0.0.1:9082",
        model_store=store,
        load_models="a.mar, b=b.mar",
        # Java properties drop a lone backslash: a regex's "\." is written "\\." there.
        allowed_urls=r"https://models\\.example/.*,file:///srv/.*",
        enable_model_api="true",
        disable_token_authorization="true",
        default_workers_per_model=3,
        job_queue_size=7,
        max_request_size=1024,
        default_response_timeout=11,
        default_startup_timeout=12,
        number_of_netty_threads=4,  # TorchServe-only keys are ignored
    )
    settings = start_ok(started, "--ts-config", str(config))
    assert settings.inference_address == "http://127.0.0.1:9080"
    assert settings.bind("management") == ("0.0.0.0", 9081)
    assert settings.metrics_address == "http://127.0.0.1:9082"
    assert settings.model_store == store
    assert settings.load_models == ("a.mar", "b=b.mar")
    assert settings.allowed_urls == (r"https://models\.example/.*", "file:///srv/.*")
    assert settings.enable_model_api
    assert not settings.token_auth
    assert settings.default_workers_per_model == 3
    assert settings.job_queue_size == 7
    assert settings.max_request_size == 1024
    assert settings.default_response_timeout == 11
    assert settings.default_startup_timeout == 12


def test_flags_override_the_config_file(
    started: list[tuple[Settings, bool]], tmp_path: Path
) -> None:
    from_config, from_flag = tmp_path / "a", tmp_path / "b"
    from_config.mkdir()
    from_flag.mkdir()
    config = write_config(
        tmp_path / "config.properties",
        model_store=from_config,
        load_models="config.mar",
        enable_model_api="false",
        disable_token_authorization="false",
    )
    settings = start_ok(
        started,
        *("--ts-config", str(config), "--model-store", str(from_flag)),
        *("--models", "flag.mar", "--enable-model-api", "--dt"),
        *("--redis-url", "redis://127.0.0.1:6390/0", "--foreground"),
    )
    assert settings.model_store == from_flag
    assert settings.load_models == ("flag.mar",)
    assert settings.enable_model_api
    assert settings.disable_token_authorization
    assert settings.redis_url == "redis://127.0.0.1:6390/0"
    assert started[0][1] is True


def test_absent_flags_keep_the_config_values(
    started: list[tuple[Settings, bool]], tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "config.properties", enable_model_api="true", load_models="x.mar"
    )
    settings = start_ok(started, "--ts-config", str(config))
    assert settings.enable_model_api
    assert settings.load_models == ("x.mar",)
    assert settings.max_request_size == DEFAULT_MAX_REQUEST_SIZE


def test_models_accepts_commas_repeats_and_torchserve_style_lists(
    started: list[tuple[Settings, bool]], tmp_path: Path
) -> None:
    settings = start_ok(
        started, "--models", "a.mar,b=b.mar", "c.mar", "--models", "d=https://h/d.mar"
    )
    assert settings.load_models == ("a.mar", "b=b.mar", "d=https://h/d.mar", "c.mar")


def test_stray_arguments_without_models_are_a_usage_error(
    started: list[tuple[Settings, bool]],
) -> None:
    result = invoke("start", "a.mar")
    assert result.exit_code == 2
    assert "unexpected argument" in result.output
    assert started == []


def test_env_references_are_expanded(
    started: list[tuple[Settings, bool]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "expanded"
    store.mkdir()
    monkeypatch.setenv("MQS_TEST_STORE", str(store))
    monkeypatch.setenv("MQS_TEST_PORT", "9181")
    config = write_config(
        tmp_path / "config.properties",
        model_store="$$MQS_TEST_STORE$$",
        management_address="http://127.0.0.1:$$MQS_TEST_PORT$$",
    )
    settings = start_ok(started, "--ts-config", str(config))
    assert settings.model_store == store
    assert settings.bind("management") == ("127.0.0.1", 9181)


def test_relative_model_store_becomes_absolute(
    started: list[tuple[Settings, bool]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rel").mkdir()
    monkeypatch.chdir(tmp_path)
    assert start_ok(started, "--model-store", "rel").model_store == tmp_path / "rel"


def test_ncs_is_accepted_and_documented(started: list[tuple[Settings, bool]], home: Path) -> None:
    assert start_ok(started, "--ncs") == Settings(home=home)
    help_text = " ".join(invoke("start", "--help").output.split())
    assert "--ncs" in help_text
    assert "persists in Redis" in help_text


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"job_queue_size": "many"}, "job_queue_size must be an integer"),
        ({"default_response_timeout": "1.5"}, "default_response_timeout must be an integer"),
        ({"job_queue_size": "0"}, "job_queue_size must be positive"),
        ({"management_address": "https://127.0.0.1:8443"}, "https and unix"),
        ({"inference_address": "http://127.0.0.1"}, "must look like"),
        ({"allowed_urls": "http://(unclosed"}, "is not a regex"),
        ({"model_store": "/nonexistent/mqserve-store"}, "is not a directory"),
        ({"load_models": "all"}, "needs a model store"),
    ],
)
def test_bad_config_values_exit_1_with_a_message(
    started: list[tuple[Settings, bool]], tmp_path: Path, config: dict[str, str], message: str
) -> None:
    path = write_config(tmp_path / "config.properties", **config)
    result = invoke("start", "--ts-config", str(path))
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert started == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ts-config", "/nonexistent/config.properties"), "cannot read config file"),
        (("--model-store", "/nonexistent/store"), "is not a directory"),
        (("--redis-url", "http://127.0.0.1:6379"), "--redis-url must be"),
    ],
)
def test_bad_flags_exit_1_with_a_message(
    started: list[tuple[Settings, bool]], args: tuple[str, ...], message: str
) -> None:
    result = invoke("start", *args)
    assert result.exit_code == 1
    assert message in result.output
    assert started == []


def test_launch_errors_print_one_line_not_a_traceback(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(settings: Settings, foreground: bool) -> int:
        raise launcher.LaunchError("mqserve is already running (pid 42); run `mqserve stop` first")

    monkeypatch.setattr(launcher, "start", fail)
    result = invoke("start")
    assert result.exit_code == 1
    assert result.output == (
        "Error: mqserve is already running (pid 42); run `mqserve stop` first\n"
    )


def test_the_detached_runner_reads_resolved_settings(
    started: list[tuple[Settings, bool]], tmp_path: Path, home: Path
) -> None:
    resolved = Settings(home=home, enable_model_api=True, load_models=("a.mar",))
    path = tmp_path / "launch.json"
    path.write_text(resolved.to_json())
    settings = start_ok(started, "--foreground", "--settings-file", str(path))
    assert settings == resolved
    assert started[0][1] is True


def test_stop_and_status_use_the_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def fake_stop(path: Path) -> int:
        seen.append(path)
        return 1

    monkeypatch.setattr(launcher, "stop", fake_stop)
    monkeypatch.setattr(launcher, "status", lambda path: ("running (pid 42)", True))
    assert invoke("stop").exit_code == 1
    assert seen == [home]
    result = invoke("status")
    assert (result.exit_code, result.output) == (0, "mqserve is running (pid 42)\n")


@pytest.mark.parametrize(
    "state", ["not running", "starting (pid 7)", "running (launcher gone; redis alive)"]
)
def test_status_exits_1_unless_healthy(
    home: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    monkeypatch.setattr(launcher, "status", lambda path: (state, False))
    result = invoke("status")
    assert result.exit_code == 1
    assert result.output.startswith(f"mqserve is {state}")


def test_status_of_an_empty_home_is_not_running(home: Path) -> None:
    result = invoke("status")
    assert (result.exit_code, result.output) == (1, "mqserve is not running\n")
