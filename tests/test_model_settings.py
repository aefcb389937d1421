"""The model settings, the price table and the budget policy: what start-up accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.model.prices import Price, Prices
from gateway.model.usage import Usage
from gateway.settings import load_settings

ISSUER = {"GATEWAY_ISSUER_API_KEYS": "k" * 20}


def workflows(policy: dict[str, object] | None = None) -> dict[str, str]:
    entry: dict[str, object] = {"upstream": "http://chatkit:8001/chatkit"}
    if policy is not None:
        entry["policy"] = policy
    return {"GATEWAY_WORKFLOWS": json.dumps({"wf_a": entry}), **ISSUER}


def test_no_model_key_means_no_model_routes() -> None:
    settings = load_settings(workflows())
    assert not settings.serves_model
    assert settings.model_upstream == "https://api.openai.com"
    assert settings.model_token_grace_seconds == 30


def test_the_model_key_can_come_from_a_file_and_is_never_shown(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-a-file\n")
    settings = load_settings({**workflows(), "GATEWAY_MODEL_API_KEY_FILE": str(key_file)})
    assert settings.serves_model
    assert settings.model_api_key is not None
    assert settings.model_api_key.get_secret_value() == "sk-from-a-file"
    assert "sk-from-a-file" not in json.dumps(settings.redacted())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # an origin only: the gateway appends the route's path
        ({**workflows(), "GATEWAY_MODEL_API_KEY": "sk-x",
          "GATEWAY_MODEL_UPSTREAM": "https://api.openai.com/v1"},
         "GATEWAY_MODEL_UPSTREAM: must be an origin"),
        # model tokens go to issued turns only
        ({"GATEWAY_MODEL_API_KEY": "sk-x"}, "GATEWAY_MODEL_API_KEY needs GATEWAY_WORKFLOWS"),
        # budgets count only calls through the gateway
        (workflows({"tokens": {"user": {"1d": 100}}}),
         "GATEWAY_WORKFLOWS.wf_a.policy has tokens/usd budgets, which need GATEWAY_MODEL_API_KEY"),
        ({**workflows({"usd": {"user": {"1w": 1.0}}}), "GATEWAY_MODEL_API_KEY": "sk-x"},
         "GATEWAY_WORKFLOWS.wf_a.policy.usd.user.1w"),
        ({**workflows({"tokens": {"user": {"1d": -5}}}), "GATEWAY_MODEL_API_KEY": "sk-x"},
         "must be positive"),
        ({**workflows({"reserve_output_tokens": 0}), "GATEWAY_MODEL_API_KEY": "sk-x"},
         "GATEWAY_WORKFLOWS.wf_a.policy.reserve_output_tokens"),
    ],
)  # fmt: skip
def test_invalid_model_settings_stop_start_up_naming_the_setting(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(env)


def test_budgets_are_read_from_the_workflow_policy() -> None:
    policy = {"tokens": {"user": {"1d": 200000}}, "usd": {"session": {"1h": 2.5}}}
    settings = load_settings({**workflows(policy), "GATEWAY_MODEL_API_KEY": "sk-x"})
    limits = settings.workflows["wf_a"].policy.budget_limits()
    assert [(x.kind, x.scope, x.seconds, x.limit) for x in limits] == [
        ("tokens", "user", 86400, 200000),
        ("usd", "session", 3600, 2_500_000),  # micro-dollars
    ]


def test_the_shipped_price_table_is_dated_and_snapshots_fall_back() -> None:
    prices = Prices.load(None)
    assert prices.date == "2025-08-07"
    assert prices("gpt-5-mini") == prices("gpt-5-mini-2025-08-07")
    assert prices("gpt-5-mini") is not None
    assert prices("no-such-model") is None
    assert prices("no-such-model-2025-08-07") is None


def test_a_price_table_file_replaces_the_shipped_one_wholesale(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"date": "2026-12-01", "models": {
        "house-model": {"input": 1.0, "cached_input": 0.5, "output": 4.0}}}))  # fmt: skip
    prices = Prices.load(str(path))
    assert prices.date == "2026-12-01"
    assert prices("gpt-5-mini") is None
    price = prices("house-model")
    assert price == Price(1.0, 0.5, 4.0)
    # (1000 - 400) x 1.0 + 400 x 0.5 + 100 x 4.0 micro-dollars
    assert price.cost(Usage(1000, 400, 100)) == 1200.0


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"models": {}}',  # no date
        '{"date": "2026-12-01", "models": {"m": {"input": -1, "cached_input": 0, "output": 0}}}',
    ],
)
def test_a_bad_price_table_stops_start_up(tmp_path: Path, content: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="GATEWAY_MODEL_PRICES"):
        Prices.load(str(path))
