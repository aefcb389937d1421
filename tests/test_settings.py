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
from gateway.settings import MIB, Settings, UnknownSecrets, file_settings, load_settings
from tests.harness import REPO_ROOT, GatewayProcess, RedisServer, free_port, gateway_env

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
        ({"GATEWAY_UPSTREAM_MAX_CONNECTIONS": "-1"}, "GATEWAY_UPSTREAM_MAX_CONNECTIONS"),
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


# -- Kubernetes service links --------------------------------------------------------------


def service_links(
    service: str, ip: str, port: int, port_name: str, proto: str = "TCP"
) -> dict[str, str]:
    """Exactly what kubelet injects for a Service with one named port."""
    prefix = service.upper().replace("-", "_")
    url = f"{proto.lower()}://{f'[{ip}]' if ':' in ip else ip}:{port}"
    link = f"{prefix}_PORT_{port}_{proto}"
    return {
        f"{prefix}_SERVICE_HOST": ip,
        f"{prefix}_SERVICE_PORT": str(port),
        f"{prefix}_SERVICE_PORT_{port_name.upper().replace('-', '_')}": str(port),
        f"{prefix}_PORT": url,
        link: url,
        f"{link}_PROTO": proto.lower(),
        f"{link}_PORT": str(port),
        f"{link}_ADDR": ip,
    }


# Services a namespace running the gateway plausibly has.
K8S_LINKS = (
    service_links("gateway", "10.96.0.10", 80, "http")
    | service_links("gateway-admin", "10.96.0.11", 8081, "admin")
    | service_links("gateway-redis", "10.96.0.12", 6379, "redis")
    | service_links("gateway-metrics", "fd00:10:96::13", 9090, "metrics-udp", proto="UDP")
    | service_links("gateway-sctp", "10.96.0.14", 3868, "diameter", proto="SCTP")
)


def test_service_link_variables_are_ignored_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="gateway.settings"):
        settings = load_settings(K8S_LINKS | {"GATEWAY_UPSTREAM_URL": "http://up.example"})
    assert settings == load_settings({"GATEWAY_UPSTREAM_URL": "http://up.example"})
    assert settings.port == 8080  # GATEWAY_PORT=tcp://... did not set the port
    assert settings.admin_port == 8081
    assert settings.redis_url is None
    warnings = [r for r in caplog.records if r.name == "gateway.settings"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for name in K8S_LINKS:
        assert name in message
    assert "enableServiceLinks" in message
    assert "10.96.0.10" not in message  # names only, never values


def test_service_links_leave_explicit_settings_alone() -> None:
    # Kubernetes lets a container's own env win over a link of the same name.
    links = K8S_LINKS | {"GATEWAY_PORT": "9000", "GATEWAY_ADMIN_PORT": "9001"}
    settings = load_settings(links)
    assert (settings.port, settings.admin_port) == (9000, 9001)


def test_no_warning_without_service_links_or_when_not_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="gateway.settings"):
        load_settings({"GATEWAY_PORT": "9000"})
        load_settings(K8S_LINKS, report_ignored=False)
    assert caplog.records == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # Link-shaped names whose values are not what Kubernetes writes.
        ("GATEWAY_PORT", "tcp//10.0.0.1:80"),
        ("GATEWAY_PORT", "http://10.0.0.1:80"),
        ("GATEWAY_ADMIN_PORT", "80800"),
        ("GATEWAY_SERVICE_HOST", "gateway.example"),
        ("GATEWAY_REDIS_PORT_6379_TCP_PORT", "redis"),
        ("GATEWAY_REDIS_PORT_6379_TCP_PROTO", "http"),
        ("GATEWAY_REDIS_PORT_6379_TCP_ADDR", "999.1.1.1"),
        ("GATEWAY_SERVICE_PORT", "0"),
        # Plain typos of real settings.
        ("GATEWAY_UPSTREM_URL", "http://x"),
        ("GATEWAY_PORTS", "tcp://10.0.0.1:80"),
    ],
)
def test_typos_that_resemble_service_links_still_fail(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value})
    assert variable in str(caught.value)


def test_serve_starts_with_service_link_variables(tmp_path: Path) -> None:
    # GATEWAY_PORT is the link's tcp:// URL here, so the listener's port comes
    # from the TOML file: the gateway answering on it proves the link was ignored.
    port = free_port()
    (tmp_path / "gateway.toml").write_text(f"port = {port}\n")
    env = K8S_LINKS | {"GATEWAY_CONFIG_FILE": str(tmp_path / "gateway.toml")}
    with GatewayProcess("http://127.0.0.1:9", port=port, env=env) as gateway:
        output = gateway.output()
    assert gateway.proc.returncode == 0
    warnings = [line for line in output.splitlines() if "service-link" in line]
    assert len(warnings) == 1, output
    assert "GATEWAY_ADMIN_SERVICE_HOST" in warnings[0]


def test_revoke_cli_runs_with_service_link_variables() -> None:
    with RedisServer() as redis:
        env = gateway_env("http://127.0.0.1:9", port=free_port(), redis_url=redis.url)
        env |= K8S_LINKS
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "revoke", "--session-id", "cksess_links"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert "session cksess_links" in result.stdout
    assert "GATEWAY_PORT_80_TCP_ADDR" in result.stderr


# -- secrets from files --------------------------------------------------------------------


ISSUER_KEYS = "sk-issuer-key-0123456789,sha256:" + "ab" * 32
SIGNING_KEY = "identity-signing-key-0123456789abcdef"


def secret_file(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    path.chmod(0o400)
    return str(path)


def test_every_secret_setting_can_come_from_a_file(tmp_path: Path) -> None:
    url = f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6390/3"
    settings = load_settings(
        {
            # Trailing newlines, as `echo` and editors leave them, are dropped.
            "GATEWAY_REDIS_URL_FILE": secret_file(tmp_path, "redis-url", url + "\n"),
            "GATEWAY_SECRET_PEPPER_FILE": secret_file(tmp_path, "pepper", PEPPER + "\r\n"),
            "GATEWAY_ADMIN_TOKEN_FILE": secret_file(tmp_path, "admin-token", ADMIN_TOKEN),
            "GATEWAY_UPSTREAM_PROXY_FILE": secret_file(
                tmp_path, "proxy", "http://u:p@proxy.internal:3128\n"
            ),
            "GATEWAY_ISSUER_API_KEYS_FILE": secret_file(tmp_path, "keys", ISSUER_KEYS + "\n"),
            "GATEWAY_IDENTITY_SIGNING_KEY_FILE": secret_file(tmp_path, "signing", SIGNING_KEY),
        }
    )
    assert settings.issuer_api_keys is not None
    assert settings.issuer_api_keys.get_secret_value() == ISSUER_KEYS
    assert settings.identity_signing_key is not None
    assert settings.identity_signing_key.get_secret_value() == SIGNING_KEY
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == url
    assert settings.secret_pepper is not None
    assert settings.secret_pepper.get_secret_value() == PEPPER
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == ADMIN_TOKEN
    assert settings.upstream_proxy is not None
    assert settings.upstream_proxy.get_secret_value() == "http://u:p@proxy.internal:3128"


def test_file_settings_cover_every_secret_field() -> None:
    # A secret setting added later is readable from a file without listing it.
    secrets = {
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    assert {
        "redis_url",
        "secret_pepper",
        "admin_token",
        "upstream_proxy",
        "issuer_api_keys",
        "identity_signing_key",
    } <= secrets
    assert secrets <= file_settings()
    assert "port" not in file_settings()  # settings that are not secrets are not


def test_file_values_are_validated_like_variables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GATEWAY_ADMIN_TOKEN_FILE": secret_file(tmp_path, "t", "short\n")})
    assert str(caught.value).startswith("GATEWAY_ADMIN_TOKEN: ")
    assert "short" not in str(caught.value).removeprefix("GATEWAY_ADMIN_TOKEN: ").split()[0]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        # Both the variable and its _FILE: which one wins would be a guess.
        (
            {"GATEWAY_SECRET_PEPPER": PEPPER, "GATEWAY_SECRET_PEPPER_FILE": "{file}"},
            "GATEWAY_SECRET_PEPPER and GATEWAY_SECRET_PEPPER_FILE are both set",
        ),
        ({"GATEWAY_SECRET_PEPPER_FILE": "{missing}"}, "GATEWAY_SECRET_PEPPER_FILE: cannot read"),
        ({"GATEWAY_SECRET_PEPPER_FILE": "{dir}"}, "GATEWAY_SECRET_PEPPER_FILE: cannot read"),
        ({"GATEWAY_SECRET_PEPPER_FILE": "{empty}"}, "GATEWAY_SECRET_PEPPER_FILE: "),
        # Only secrets come from files.
        ({"GATEWAY_PORT_FILE": "{file}"}, "GATEWAY_PORT_FILE: only secret settings"),
    ],
)
def test_bad_secret_files_give_one_line_naming_the_variable(
    tmp_path: Path, environ: dict[str, str], expected: str
) -> None:
    paths = {
        "file": secret_file(tmp_path, "pepper", PEPPER),
        "missing": str(tmp_path / "absent"),
        "dir": str(tmp_path),
        "empty": secret_file(tmp_path, "empty", "\n"),
    }
    environ = {name: value.format(**paths) for name, value in environ.items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected)
    assert PEPPER not in lines[0]


def test_serve_reads_secrets_from_files(tmp_path: Path) -> None:
    gateway = GatewayProcess(
        "http://127.0.0.1:9",
        env={
            "GATEWAY_ADMIN_TOKEN_FILE": secret_file(tmp_path, "admin", ADMIN_TOKEN + "\n"),
            "GATEWAY_ADMIN_PORT": str(free_port()),
        },
    )
    with gateway:
        output = gateway.output()
    assert "'admin_token': '***'" in output
    assert ADMIN_TOKEN not in output


# -- the egress proxy setting ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "socks5://proxy.internal:1080",  # aiohttp speaks http(s) proxies only
        "proxy.internal:3128",  # no scheme
        "http://",  # no host
        "http://proxy.internal:3128/path",
        "http://proxy.internal:3128/?a=1",
        "http://proxy.internal:99999",
    ],
)
def test_bad_upstream_proxy_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GATEWAY_UPSTREAM_PROXY": value})
    assert str(caught.value).startswith("GATEWAY_UPSTREAM_PROXY: ")


def test_upstream_proxy_credentials_are_redacted() -> None:
    settings = load_settings(
        {"GATEWAY_UPSTREAM_PROXY": f"https://egress:{REDIS_PASSWORD}@proxy.internal:3128"}
    )
    redacted = settings.redacted()
    assert redacted["upstream_proxy"] == "https://proxy.internal:3128"
    assert REDIS_PASSWORD not in repr(redacted)
    assert REDIS_PASSWORD not in repr(settings)


def test_an_admin_token_no_request_could_carry_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_ADMIN_TOKEN"):
        load_settings({"GATEWAY_ADMIN_TOKEN": "a token with spaces in it"})


def test_json_settings_nested_past_the_parser_stop_start_up_with_one_line() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_WORKFLOWS: must be JSON"):
        load_settings({"GATEWAY_WORKFLOWS": "[" * 5000 + "]" * 5000})
