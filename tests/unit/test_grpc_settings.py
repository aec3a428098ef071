"""The gRPC config.properties keys: TorchServe's defaults, parsing, refusals, and the
server options they become (message limits, connection ages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.core.settings import Settings, SettingsError, apply_properties
from control.grpc.server import server_options, target


def test_defaults_are_torchserves_on_loopback() -> None:
    settings = Settings()
    assert settings.grpc_bind("inference") == ("127.0.0.1", 7070)
    assert settings.grpc_bind("management") == ("127.0.0.1", 7071)
    assert settings.max_response_size == 6553500
    assert settings.enable_grpc_ssl is False


def test_keys_are_read_from_config_properties_and_survive_the_settings_file() -> None:
    settings = apply_properties(
        Settings(),
        {
            "grpc_inference_address": "0.0.0.0",
            "grpc_inference_port": "17070",
            "grpc_management_port": "17071",
            "max_request_size": "100",
            "max_response_size": "200",
            "grpc_management_max_connection_age_ms": "60000",
            "grpc_management_max_connection_age_grace_ms": "5000",
        },
    )
    assert settings.grpc_bind("inference") == ("0.0.0.0", 17070)
    assert settings.grpc_bind("management") == ("127.0.0.1", 17071)
    assert Settings.from_json(settings.to_json()) == settings
    inference = dict(server_options(settings, "inference"))
    assert inference["grpc.max_receive_message_length"] == 100
    assert inference["grpc.max_send_message_length"] == 200
    assert inference["grpc.so_reuseport"] == 0
    assert "grpc.max_connection_age_ms" not in inference  # infinite, as TorchServe's default
    management = dict(server_options(settings, "management"))
    assert management["grpc.max_connection_age_ms"] == 60000
    assert management["grpc.max_connection_age_grace_ms"] == 5000


@pytest.mark.parametrize(
    ("props", "words"),
    [
        ({"enable_grpc_ssl": "true"}, "enable_grpc_ssl=true needs certificate_file"),
        ({"grpc_inference_port": "70000"}, "grpc_inference_port must be between"),
        ({"grpc_management_port": "seven"}, "grpc_management_port must be an integer"),
        ({"grpc_management_address": "http://0.0.0.0"}, "must be a bare host"),
        ({"max_response_size": "0"}, "max_response_size must be positive"),
        ({"grpc_inference_max_connection_age_ms": "-1"}, "must be positive"),
    ],
)
def test_unusable_values_refuse_to_start(props: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        apply_properties(Settings(), props)


def test_ipv6_hosts_are_bracketed() -> None:
    assert target("::1", 7070) == "[::1]:7070"
    assert target("127.0.0.1", 7070) == "127.0.0.1:7070"


def test_tls_needs_a_readable_certificate_and_key(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("certificate")
    props = {"enable_grpc_ssl": "true", "certificate_file": str(cert)}
    with pytest.raises(SettingsError, match="needs private_key_file"):
        apply_properties(Settings(), props)
    with pytest.raises(SettingsError, match="is not a readable file"):
        apply_properties(Settings(), {**props, "private_key_file": str(key)})
    key.write_text("key")
    settings = apply_properties(Settings(), {**props, "private_key_file": str(key)})
    assert (settings.certificate_file, settings.private_key_file) == (cert, key)
    assert Settings.from_json(settings.to_json()) == settings
