"""Learning a session from a session-create response, as it passes through.

What the gateway records (the hash, never the secret), which limit wins, and
which answers cannot be learned from, one row per case.
"""

from __future__ import annotations

import json

import pytest

from gateway.auth import SecretHasher
from gateway.registry import DEFAULT_TTL_SECONDS, Unlearnable, session_from_response

# -- learning sessions ---------------------------------------------------------------

HASHER = SecretHasher(b"test-pepper")
NOW = 1_750_000_000.0


def _session(**fields: object) -> bytes:
    body: dict[str, object] = {
        "id": "cksess_123",
        "object": "chatkit.session",
        "expires_at": int(NOW) + 600,
        "client_secret": "ek_secret_value",
        "user": "user_alice",
        "status": "active",
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        # Both present: the top-level copy wins.
        ({"max_requests_per_1_minute": 7, "rate_limits": {"max_requests_per_1_minute": 9}}, 7),
        ({"rate_limits": {"max_requests_per_1_minute": 9}}, 9),  # only the nested one
        ({"max_requests_per_1_minute": 4}, 4),  # only the top-level one
        ({}, 25),  # neither: the configured default
        ({"rate_limits": {}}, 25),  # an empty rate_limits object
        ({"rate_limits": None, "max_requests_per_1_minute": None}, 25),  # explicit nulls
        # Values that are not a positive integer fall through to the next source.
        ({"max_requests_per_1_minute": 0, "rate_limits": {"max_requests_per_1_minute": 3}}, 3),
        ({"max_requests_per_1_minute": "5", "rate_limits": {"max_requests_per_1_minute": 3}}, 3),
        ({"max_requests_per_1_minute": True, "rate_limits": {"max_requests_per_1_minute": 3}}, 3),
        ({"max_requests_per_1_minute": 2.5}, 25),
        ({"rate_limits": {"max_requests_per_1_minute": -1}}, 25),
        ({"rate_limits": [10]}, 25),  # a wrongly shaped rate_limits
    ],
)
def test_limit_precedence(fields: dict[str, object], limit: int) -> None:
    record = session_from_response(_session(**fields), hasher=HASHER, default_limit=25, now=NOW)
    assert record.limit == limit


def test_session_record_holds_the_hash_never_the_secret() -> None:
    record = session_from_response(_session(), hasher=HASHER, default_limit=10, now=NOW)
    assert record.secret_hash == HASHER(b"ek_secret_value")
    assert record.session_id == "cksess_123"
    assert record.user == "user_alice"
    assert record.expires_at == int(NOW) + 600
    assert "ek_secret_value" not in repr(record)


def test_unknown_extra_fields_are_tolerated() -> None:
    body = _session(
        scope={"customer_id": "c1"},  # the stale cancel example's fields
        ttl_seconds=600,
        cancelled_at=None,
        chatkit_configuration={"file_upload": {"enabled": True}, "brand_new": [1, 2]},
        workflow={"id": "wf_1", "version": "3", "unheard_of": {"x": 1}},
        future_field="anything",
    )
    record = session_from_response(body, hasher=HASHER, default_limit=10, now=NOW)
    assert record.session_id == "cksess_123"


def test_nested_client_secret_object_is_accepted() -> None:
    body = _session(client_secret={"value": "ek_nested", "expires_at": int(NOW) + 60})
    record = session_from_response(body, hasher=HASHER, default_limit=10, now=NOW)
    assert record.secret_hash == HASHER(b"ek_nested")


@pytest.mark.parametrize(
    ("fields", "user", "expires_at"),
    [
        ({"expires_at": ...}, "user_alice", int(NOW) + DEFAULT_TTL_SECONDS),  # API default TTL
        ({"expires_at": "soon"}, "user_alice", int(NOW) + DEFAULT_TTL_SECONDS),
        ({"expires_at": 0}, "user_alice", int(NOW) + DEFAULT_TTL_SECONDS),
        ({"user": ...}, "", int(NOW) + 600),  # no user: no per-user window
        ({"user": 42}, "", int(NOW) + 600),
    ],
)
def test_missing_optional_fields_get_defaults(
    fields: dict[str, object], user: str, expires_at: int
) -> None:
    record = session_from_response(_session(**fields), hasher=HASHER, default_limit=10, now=NOW)
    assert record.user == user
    assert record.expires_at == expires_at


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>502 Bad Gateway</html>", "not_json"),  # an HTML error page with a 2xx
        (b"", "not_json"),
        (b"\xff\xfe{}", "not_json"),  # not UTF-8
        (b'{"id": "cksess_1", "client_secret": ', "not_json"),  # truncated
        (b"[]", "not_object"),
        (b'"ek_secret"', "not_object"),
        (b"null", "not_object"),
        (_session(client_secret=...), "no_client_secret"),  # the stale cancel shape
        (_session(client_secret=""), "no_client_secret"),
        (_session(client_secret=None), "no_client_secret"),
        (_session(client_secret=12345), "no_client_secret"),
        (_session(client_secret={"expires_at": 1}), "no_client_secret"),  # nested, no value
        (_session(id=...), "bad_session_id"),
        (_session(id="cksess_{tag}"), "bad_session_id"),  # braces would break the hash tag
        (_session(id=""), "bad_session_id"),
    ],
)
def test_unlearnable_bodies_raise_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(Unlearnable) as caught:
        session_from_response(body, hasher=HASHER, default_limit=10, now=NOW)
    assert caught.value.reason == reason
