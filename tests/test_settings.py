"""Settings (gateway/settings.py) and how the CLI reacts to bad ones.

``load_settings`` takes the environment as a mapping, so these tests never
touch ``os.environ``; the last tests run the real ``python -m gateway serve``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.errors import ConfigError
from gateway.settings import MIB, Settings, UnknownSecrets, load_settings
from tests.harness import REPO_ROOT, GatewayProcess, free_port, gateway_env

ADMIN_TOKEN = "admin-token-0123456789-abcdef"
PEPPER = "pepper-value-9f8e7d6c"
REDIS_PASSWORD = "hunter2-redis-password"


def test_defaults() -> None:
    settings = load_settings({})
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.upstream_url == "https://api.openai.com"
    assert settings.redis_url is None  # the embedded store
    assert settings.unknown_secrets is UnknownSecrets.REJECT
    assert settings.default_max_requests_per_1_minute == 10
    assert settings.window_seconds == 60
    assert settings.enforce is True
    assert settings.trust_forwarded_headers is False
    assert settings.admin_token is None
    assert settings.max_body_bytes >= 512 * MIB  # a 512 MB upload fits
    # The documented upstream timeouts: a streamed answer may go quiet for minutes.
    assert (
        settings.upstream_connect_timeout,
        settings.upstream_read_timeout,
        settings.upstream_write_timeout,
        settings.upstream_pool_timeout,
    ) == (5.0, 300.0, 60.0, 5.0)


def test_environment_values_are_parsed() -> None:
    settings = load_settings(
        {
            "GATEWAY_PORT": "9001",
            "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9002/",
            "GATEWAY_UPSTREAM_READ_TIMEOUT": "0.5",
            "GATEWAY_MAX_BODY_BYTES": "1024",
            "GATEWAY_UNKNOWN_SECRETS": "allow",
            "GATEWAY_ENFORCE": "false",
            "GATEWAY_TRUST_FORWARDED_HEADERS": "true",
            "GATEWAY_REDIS_URL": "redis://127.0.0.1:6390/2",
            "GATEWAY_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.port == 9001
    assert settings.upstream_url == "http://127.0.0.1:9002"  # trailing slash dropped
    assert settings.upstream_read_timeout == 0.5
    assert settings.max_body_bytes == 1024
    assert settings.unknown_secrets is UnknownSecrets.ALLOW
    assert settings.enforce is False
    assert settings.trust_forwarded_headers is True
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6390/2"
    assert settings.log_level == "debug"


def test_other_variables_are_ignored_and_empty_ones_mean_default() -> None:
    settings = load_settings({"PATH": "/usr/bin", "PORT": "1", "GATEWAY_PORT": ""})
    assert settings.port == 8080


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(ValidationError):
        settings.port = 1


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"GATEWAY_PORT": "0"}, "GATEWAY_PORT"),
        ({"GATEWAY_PORT": "65536"}, "GATEWAY_PORT"),
        ({"GATEWAY_PORT": "http"}, "GATEWAY_PORT"),
        ({"GATEWAY_WORKERS": "0"}, "GATEWAY_WORKERS"),
        ({"GATEWAY_UPSTREAM_URL": "ftp://x"}, "GATEWAY_UPSTREAM_URL"),
        ({"GATEWAY_UPSTREAM_URL": "api.openai.com"}, "GATEWAY_UPSTREAM_URL"),  # no scheme
        ({"GATEWAY_UPSTREAM_URL": "http://"}, "GATEWAY_UPSTREAM_URL"),  # no host
        ({"GATEWAY_UPSTREAM_URL": "https://u:p@api.example"}, "GATEWAY_UPSTREAM_URL"),
        ({"GATEWAY_UPSTREAM_URL": "https://api.example/?a=1"}, "GATEWAY_UPSTREAM_URL"),
        ({"GATEWAY_UPSTREAM_CONNECT_TIMEOUT": "0"}, "GATEWAY_UPSTREAM_CONNECT_TIMEOUT"),
        ({"GATEWAY_UPSTREAM_READ_TIMEOUT": "-1"}, "GATEWAY_UPSTREAM_READ_TIMEOUT"),
        ({"GATEWAY_UPSTREAM_WRITE_TIMEOUT": "soon"}, "GATEWAY_UPSTREAM_WRITE_TIMEOUT"),
        ({"GATEWAY_UPSTREAM_POOL_TIMEOUT": "0"}, "GATEWAY_UPSTREAM_POOL_TIMEOUT"),
        ({"GATEWAY_UPSTREAM_MAX_CONNECTIONS": "0"}, "GATEWAY_UPSTREAM_MAX_CONNECTIONS"),
        ({"GATEWAY_MAX_BODY_BYTES": "-1"}, "GATEWAY_MAX_BODY_BYTES"),
        ({"GATEWAY_MAX_HEADER_BYTES": "100"}, "GATEWAY_MAX_HEADER_BYTES"),
        ({"GATEWAY_MAX_HEADERS": "3"}, "GATEWAY_MAX_HEADERS"),
        ({"GATEWAY_REDIS_URL": "http://localhost:6379"}, "GATEWAY_REDIS_URL"),
        ({"GATEWAY_LOG_LEVEL": "loud"}, "GATEWAY_LOG_LEVEL"),
        ({"GATEWAY_UNKNOWN_SECRETS": "maybe"}, "GATEWAY_UNKNOWN_SECRETS"),
        ({"GATEWAY_ENFORCE": "perhaps"}, "GATEWAY_ENFORCE"),
        (
            {"GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE": "0"},
            "GATEWAY_DEFAULT_MAX_REQUESTS_PER_1_MINUTE",
        ),
        ({"GATEWAY_WINDOW_SECONDS": "0"}, "GATEWAY_WINDOW_SECONDS"),
        ({"GATEWAY_KEY_PREFIX": "has space"}, "GATEWAY_KEY_PREFIX"),
        ({"GATEWAY_ADMIN_TOKEN": "short"}, "GATEWAY_ADMIN_TOKEN"),  # under 16 characters
        # Cross-field rules still name the variable to fix.
        ({"GATEWAY_REDIS_CLUSTER": "true"}, "GATEWAY_REDIS_CLUSTER"),
        (
            {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "GATEWAY_ADMIN_PORT": "8080"},
            "GATEWAY_ADMIN_PORT",
        ),
        # A misspelt variable is an error, not silently ignored.
        ({"GATEWAY_FOO": "1"}, "GATEWAY_FOO"),
        ({"GATEWAY_UPSTREAM": "http://x"}, "GATEWAY_UPSTREAM"),
    ],
)
def test_each_invalid_value_gives_one_line_naming_the_variable(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert variable in lines[0]
    # The line says what is wrong, not only where.
    assert len(lines[0]) > len(variable) + 10


def test_several_invalid_values_give_one_line_each() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GATEWAY_PORT": "0", "GATEWAY_UPSTREAM_URL": "ftp://x"})
    lines = sorted(str(caught.value).splitlines())
    assert len(lines) == 2
    assert lines[0].startswith("GATEWAY_PORT: ")
    assert lines[1].startswith("GATEWAY_UPSTREAM_URL: ")


def test_invalid_secret_values_are_not_echoed() -> None:
    url = f"http://user:{REDIS_PASSWORD}@localhost:6379"
    with pytest.raises(ConfigError) as caught:
        load_settings({"GATEWAY_REDIS_URL": url, "GATEWAY_ADMIN_TOKEN": "tok-SHORT"})
    assert REDIS_PASSWORD not in str(caught.value)
    assert "tok-SHORT" not in str(caught.value)


# -- the TOML file --------------------------------------------------------------------


def write_toml(path: Path, text: str) -> dict[str, str]:
    path.write_text(text)
    return {"GATEWAY_CONFIG_FILE": str(path)}


def test_toml_file_supplies_values_and_the_environment_wins(tmp_path: Path) -> None:
    environ = write_toml(
        tmp_path / "gateway.toml",
        'port = 9100\nupstream_url = "http://file.example"\nlog_level = "debug"\n'
        "max_headers = 50\n",
    )
    environ |= {"GATEWAY_PORT": "9200", "GATEWAY_LOG_LEVEL": "warning"}
    settings = load_settings(environ)
    assert settings.port == 9200  # environment over file
    assert settings.log_level == "warning"
    assert settings.upstream_url == "http://file.example"  # file over default
    assert settings.max_headers == 50


@pytest.mark.parametrize(
    ("text", "variable"),
    [
        ("port = 0\n", "GATEWAY_PORT"),  # invalid value in the file
        ('upstream_url = "ftp://x"\n', "GATEWAY_UPSTREAM_URL"),
        ("foo = 1\n", "GATEWAY_FOO"),  # unknown key in the file
        ("port = \n", "GATEWAY_CONFIG_FILE"),  # not TOML
    ],
)
def test_bad_toml_file_names_the_setting(tmp_path: Path, text: str, variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_toml(tmp_path / "gateway.toml", text))
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert variable in lines[0]


def test_missing_toml_file_names_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings({"GATEWAY_CONFIG_FILE": str(missing)})
    assert str(caught.value).startswith("GATEWAY_CONFIG_FILE: ")
    assert str(missing) in str(caught.value)


# -- redaction ---------------------------------------------------------------------------


def test_redacted_masks_every_secret() -> None:
    settings = load_settings(
        {
            "GATEWAY_REDIS_URL": f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6390/3",
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "GATEWAY_SECRET_PEPPER": PEPPER,
            "GATEWAY_ADMIN_PORT": "9999",
        }
    )
    redacted = settings.redacted()
    text = repr(redacted)
    for secret in (REDIS_PASSWORD, ADMIN_TOKEN, PEPPER, "default:"):
        assert secret not in text
    assert redacted["redis_url"] == "redis://127.0.0.1:6390/3"  # still says where
    assert redacted["admin_token"] == "***"
    assert redacted["secret_pepper"] == "***"
    assert redacted["port"] == 8080  # the rest is shown as is
    assert redacted["unknown_secrets"] == "reject"
    # The settings object itself does not print secrets either.
    for secret in (REDIS_PASSWORD, ADMIN_TOKEN, PEPPER):
        assert secret not in repr(settings)
        assert secret not in str(settings)


def test_redacted_shows_unset_secrets_as_none() -> None:
    redacted = load_settings({}).redacted()
    assert redacted["redis_url"] is None
    assert redacted["admin_token"] is None
    assert redacted["secret_pepper"] is None
    assert set(redacted) == set(Settings.model_fields)


# -- the real CLI -------------------------------------------------------------------------


def run_serve(extra: dict[str, str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = gateway_env("http://127.0.0.1:9", port=free_port(), extra=extra)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("extra", "variable"),
    [
        ({"GATEWAY_PORT": "0"}, "GATEWAY_PORT"),
        ({"GATEWAY_UPSTREAM_URL": "ftp://x"}, "GATEWAY_UPSTREAM_URL"),
        ({"GATEWAY_FOO": "1"}, "GATEWAY_FOO"),
    ],
)
def test_serve_with_a_bad_variable_exits_2_with_one_line(
    extra: dict[str, str], variable: str
) -> None:
    result = run_serve(extra)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"chatkit-gateway: {variable}: ")
    assert result.stdout == ""


def test_start_up_line_shows_the_configuration_without_secrets() -> None:
    gateway = GatewayProcess(
        "http://127.0.0.1:9",
        env={
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "GATEWAY_ADMIN_PORT": str(free_port()),
            "GATEWAY_SECRET_PEPPER": PEPPER,
        },
    )
    with gateway:
        output = gateway.output()
    assert gateway.proc.returncode == 0  # SIGTERM is a clean shutdown
    ready = [line for line in output.splitlines() if "chatkit-gateway ready" in line]
    assert len(ready) == 1, output
    assert f"'port': {gateway.port}" in ready[0]
    assert "'admin_token': '***'" in ready[0]
    for secret in (ADMIN_TOKEN, PEPPER):
        assert secret not in output
