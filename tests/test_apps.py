"""GATEWAY_ISSUER_KEYS as configured: parsed from JSON, TOML or a file, refused
with one line naming the app and field, and keys found by hash."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from gateway.apps import DEFAULT_APP, AppKeys, OnTooManySessions, build_apps
from gateway.errors import ConfigError
from gateway.settings import load_settings

KEYS = ("ckgk_first-app-key-0123456789", "ckgk_second-app-key-0123456789")
WORKFLOWS = json.dumps(
    {"wf_a": {"upstream": "http://chatkit:8001/chatkit"}, "wf_b": {"upstream": "http://b/chatkit"}}
)


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def settings_with(apps: object, **extra: str) -> dict[str, str]:
    return {"GATEWAY_WORKFLOWS": WORKFLOWS, "GATEWAY_ISSUER_KEYS": json.dumps(apps), **extra}


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


def test_each_key_finds_its_own_app_and_no_other() -> None:
    settings = load_settings(
        settings_with(
            {
                "support": {"keys": [digest(KEYS[0])], "workflows": ["wf_a"]},
                "billing": {
                    "keys": [digest(KEYS[1]).upper().replace("SHA256:", "sha256:")],
                    "workflows": ["wf_b"],
                    "max_sessions_per_minute": 60,
                    "max_active_sessions_per_user": 2,
                    "on_too_many_sessions": "refuse",
                },
            },
            GATEWAY_ISSUER_API_KEYS="ckgk_legacy-key-0123456789",
        )
    )
    keys = AppKeys(build_apps(settings))
    support = keys.identify(bearer(KEYS[0]))
    billing = keys.identify(bearer(KEYS[1]))
    legacy = keys.identify(bearer("ckgk_legacy-key-0123456789"))
    assert support is not None
    assert billing is not None
    assert legacy is not None
    assert (support.name, support.may_use("wf_a"), support.may_use("wf_b")) == (
        "support",
        True,
        False,
    )
    assert billing.on_too_many_sessions is OnTooManySessions.REFUSE
    assert (billing.max_sessions_per_minute, billing.max_active_sessions_per_user) == (60, 2)
    assert support.on_too_many_sessions is OnTooManySessions.REVOKE_OLDEST  # the default
    assert (legacy.name, legacy.may_use("anything")) == (DEFAULT_APP, True)
    assert keys.identify(bearer(digest(KEYS[0]))) is None  # a digest is not a key
    assert keys.identify(bearer("ckgk_unknown-key-0123456789")) is None
    assert keys.identify([]) is None
    assert digest(KEYS[0]) not in json.dumps(settings.redacted(), default=str)


@pytest.mark.parametrize(
    ("apps", "line"),
    [
        # A key in clear: only digests are configured.
        (
            {"support": {"keys": [KEYS[0]], "workflows": ["wf_a"]}},
            "GATEWAY_ISSUER_KEYS.support.keys: each key must be 'sha256:' and 64 hex digits",
        ),
        # No key at all.
        (
            {"support": {"keys": [], "workflows": ["wf_a"]}},
            "GATEWAY_ISSUER_KEYS.support.keys:",
        ),
        # A workflow the gateway does not issue.
        (
            {"support": {"keys": [digest(KEYS[0])], "workflows": ["wf_x"]}},
            "GATEWAY_ISSUER_KEYS.support.workflows: 'wf_x' is not in GATEWAY_WORKFLOWS",
        ),
        # Least privilege: the workflows must be named.
        (
            {"support": {"keys": [digest(KEYS[0])]}},
            "GATEWAY_ISSUER_KEYS.support.workflows: Field required",
        ),
        # A number as a string is a mistake, not a number.
        (
            {
                "support": {
                    "keys": [digest(KEYS[0])],
                    "workflows": ["wf_a"],
                    "max_sessions_per_minute": "600",
                }
            },
            "GATEWAY_ISSUER_KEYS.support.max_sessions_per_minute: Input should be a valid integer",
        ),
        (
            {
                "support": {
                    "keys": [digest(KEYS[0])],
                    "workflows": ["wf_a"],
                    "max_active_sessions_per_user": 0,
                }
            },
            "GATEWAY_ISSUER_KEYS.support.max_active_sessions_per_user: Input should be greater",
        ),
        (
            {
                "support": {
                    "keys": [digest(KEYS[0])],
                    "workflows": ["wf_a"],
                    "on_too_many_sessions": "queue",
                }
            },
            "GATEWAY_ISSUER_KEYS.support.on_too_many_sessions: Input should be 'revoke_oldest'",
        ),
        (
            {"support": {"keys": [digest(KEYS[0])], "workflows": ["wf_a"], "limit": 1}},
            "GATEWAY_ISSUER_KEYS.support.limit: Extra inputs are not permitted",
        ),
        # One key, two apps: which one would it be?
        (
            {
                "support": {"keys": [digest(KEYS[0])], "workflows": ["wf_a"]},
                "billing": {"keys": [digest(KEYS[0])], "workflows": ["wf_b"]},
            },
            "GATEWAY_ISSUER_KEYS: app 'billing': a key of app 'support' is listed again",
        ),
        (
            {"Support App": {"keys": [digest(KEYS[0])], "workflows": ["wf_a"]}},
            "GATEWAY_ISSUER_KEYS: app name 'Support App' must match",
        ),
    ],
)
def test_an_invalid_app_stops_start_up_with_one_line_naming_app_and_field(
    apps: object, line: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(settings_with(apps))
    message = str(caught.value)
    assert line in message
    assert len(message.splitlines()) == 1


def test_default_is_the_old_keys_name() -> None:
    with pytest.raises(ConfigError, match=re.escape("GATEWAY_ISSUER_KEYS.default: the name")):
        load_settings(
            settings_with(
                {"default": {"keys": [digest(KEYS[0])], "workflows": ["wf_a"]}},
                GATEWAY_ISSUER_API_KEYS="ckgk_legacy-key-0123456789",
            )
        )


def test_apps_come_from_toml_tables_or_a_file(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        '[workflows.wf_a]\nupstream = "http://chatkit:8001/chatkit"\n\n'
        f'[issuer_keys.support]\nkeys = ["{digest(KEYS[0])}"]\nworkflows = ["wf_a"]\n'
        "max_active_sessions_per_user = 3\n"
    )
    from_toml = load_settings({"GATEWAY_CONFIG_FILE": str(toml)})
    assert from_toml.issuer_keys["support"].max_active_sessions_per_user == 3

    secret_file = tmp_path / "issuer-keys.json"
    secret_file.write_text(
        json.dumps({"support": {"keys": [digest(KEYS[1])], "workflows": ["wf_a"]}}) + "\n"
    )
    from_file = load_settings(
        {"GATEWAY_WORKFLOWS": WORKFLOWS, "GATEWAY_ISSUER_KEYS_FILE": str(secret_file)}
    )
    assert from_file.issuer_keys["support"].keys == (digest(KEYS[1]),)


def test_the_example_configurations_commented_app_is_valid(tmp_path: Path) -> None:
    example = (Path(__file__).parent.parent / "config" / "gateway.example.toml").read_text()
    tables = example[example.index("# [workflows.") :]
    uncommented = "\n".join(
        line.removeprefix("# ")
        for line in tables.splitlines()
        # Tables nest (a workflow's policy); window keys start with a digit ("1d").
        if re.match(r"^# \[[a-z_]+(\.[a-z0-9_-]+)+\]$", line) or re.match(r"^# [a-z0-9_]+ = ", line)
    )
    toml = tmp_path / "example.toml"
    toml.write_text(uncommented)
    settings = load_settings({"GATEWAY_CONFIG_FILE": str(toml)})
    assert settings.issuer_keys["support-app"].workflows == ("wf_support",)
    assert settings.workflows["wf_support"].policy.windows()["turn"] == "u86400:200"
