"""Pure decisions on the hot path: bearer parsing, secret hashing, rate-limit headers,
rejections, and learning a session from a session-create response.

Everything here is a function of its arguments, so the tables below are the
specification: one row per case, a comment saying why the row exists.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re

import pytest

from gateway.auth import MAX_SECRET_BYTES, SecretHasher, bearer_secret, constant_time_equal
from gateway.errors import AuthError, RateLimited
from gateway.ratelimit import (
    ADMIT_UNLIMITED,
    Decision,
    Outcome,
    Window,
    duration,
    rate_limit_headers,
    rejection,
)
from gateway.registry import DEFAULT_TTL_SECONDS, Unlearnable, session_from_response

Headers = list[tuple[bytes, bytes]]
SECRET = b"ek_68f1c2d3e4_Zm9vYmFy-._~+/="


def _auth(*values: bytes) -> Headers:
    """ASGI headers (lower-case names) with one Authorization header per value."""
    return [(b"host", b"gateway"), *((b"authorization", v) for v in values)]


# -- bearer parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "secret"),
    [
        (_auth(b"Bearer " + SECRET), SECRET),  # the canonical form
        (_auth(b"bearer " + SECRET), SECRET),  # the scheme is case-insensitive (RFC 9110 11.1)
        (_auth(b"BEARER " + SECRET), SECRET),
        (_auth(b"BeArEr " + SECRET), SECRET),
        (_auth(b"Bearer   " + SECRET + b"  "), SECRET),  # surrounding spaces are not the token
        (_auth(b"Bearer " + b"a" * MAX_SECRET_BYTES), b"a" * MAX_SECRET_BYTES),  # at the cap
        (_auth(b"Bearer ek_token_123"), b"ek_token_123"),  # the spec's example secret
    ],
)
def test_bearer_secret_is_extracted(headers: Headers, secret: bytes) -> None:
    assert bearer_secret(headers) == secret


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([(b"host", b"gateway")], "missing_client_secret"),  # no Authorization at all
        ([], "missing_client_secret"),
        (_auth(b"Basic " + SECRET), "invalid_authorization"),  # wrong scheme
        (_auth(SECRET), "invalid_authorization"),  # no scheme
        (_auth(b"Bearer"), "invalid_authorization"),  # scheme, no token
        (_auth(b"Bearer "), "invalid_authorization"),  # empty token
        (_auth(b"Bearer    "), "invalid_authorization"),  # only spaces
        (_auth(b"Bearer" + SECRET), "invalid_authorization"),  # no separating space
        (_auth(b"Bearer\t" + SECRET), "invalid_authorization"),  # tab is not the separator
        (_auth(b"Bearer " + SECRET, b"Bearer " + SECRET), "invalid_authorization"),  # duplicate
        (_auth(b"Bearer " + SECRET, b"Basic x"), "invalid_authorization"),  # two, one bad
        (_auth(b"Bearer ek_\xff\xfe"), "invalid_authorization"),  # non-ASCII bytes
        (_auth(b"Bearer ek_a\x00b"), "invalid_authorization"),  # control byte
        (_auth(b"Bearer ek_a b"), "invalid_authorization"),  # two tokens
        (_auth(b'Bearer ek_"quoted"'), "invalid_authorization"),  # outside b64token
        (_auth(b"Bearer ek_{tag}"), "invalid_authorization"),  # braces would touch key tags
        (_auth(b"Bearer " + b"a" * (MAX_SECRET_BYTES + 1)), "invalid_authorization"),  # too long
    ],
)
def test_bad_authorization_is_refused(headers: Headers, code: str) -> None:
    with pytest.raises(AuthError) as caught:
        bearer_secret(headers)
    assert caught.value.status == 401
    assert caught.value.code == code
    # The message tells the caller what to send, never echoes what they sent.
    assert SECRET.decode() not in caught.value.message
    assert "ek_" not in caught.value.message


def test_other_headers_named_like_authorization_are_ignored() -> None:
    headers = [(b"proxy-authorization", b"Bearer nope"), (b"x-authorization", b"Bearer no")]
    with pytest.raises(AuthError) as caught:
        bearer_secret(headers)
    assert caught.value.code == "missing_client_secret"


# -- hashing -------------------------------------------------------------------------


def test_peppered_hash_is_hmac_sha256_under_the_pepper() -> None:
    pepper = b"a-long-operator-chosen-pepper"
    expected = hmac.new(pepper, SECRET, hashlib.sha256).hexdigest()
    assert SecretHasher(pepper)(SECRET) == expected


def test_unpeppered_hash_is_a_keyed_hash_not_plain_sha256() -> None:
    digest = SecretHasher(None)(SECRET)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != hashlib.sha256(SECRET).hexdigest()
    assert SECRET.decode() not in digest


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (SecretHasher(None), SecretHasher(b"pepper-one")),  # a pepper changes every hash
        (SecretHasher(b"pepper-one"), SecretHasher(b"pepper-two")),  # and each pepper differs
    ],
)
def test_hashes_differ_between_keys(a: SecretHasher, b: SecretHasher) -> None:
    assert a(SECRET) != b(SECRET)


def test_hash_is_deterministic_and_separates_secrets() -> None:
    hasher = SecretHasher(b"pepper")
    assert hasher(SECRET) == SecretHasher(b"pepper")(SECRET)  # every replica agrees
    assert hasher(SECRET) != hasher(SECRET + b"x")


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("token-aaaaaaaaaaaa", "token-aaaaaaaaaaaa", True),
        ("token-aaaaaaaaaaaa", "token-aaaaaaaaaaab", False),  # last byte differs
        ("token-aaaaaaaaaaaa", "token-aaa", False),  # prefix only
        (b"bytes-token", "bytes-token", True),  # str and bytes compare by content
    ],
)
def test_constant_time_equal(a: str | bytes, b: str | bytes, equal: bool) -> None:
    assert constant_time_equal(a, b) is equal


# -- durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (-5, "0ms"),  # never negative
        (20, "20ms"),  # OpenAI's sub-second form
        (999, "999ms"),
        (1000, "1s"),  # whole seconds have no fraction
        (1500, "1.5s"),
        (1001, "1.001s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),  # Go's duration format keeps "0s" after minutes
        (61_500, "1m1.5s"),
        (360_000, "6m0s"),  # the example in OpenAI's docs
        (3_599_000, "59m59s"),
    ],
)
def test_duration_matches_openai_format(ms: int, text: str) -> None:
    assert duration(ms) == text


# -- rate-limit headers --------------------------------------------------------------


def _headers(pairs: Headers) -> dict[str, str]:
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), "no header may appear twice"
    return {name.decode(): value.decode() for name, value in pairs}


def test_headers_for_a_session_window() -> None:
    decision = Decision(
        Outcome.ADMITTED, Window(limit=10, remaining=7, wait_ms=1500, reset_ms=60_000)
    )
    assert _headers(rate_limit_headers(decision, window_seconds=60)) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": "1m0s",
        "ratelimit-policy": '"session";q=10;w=60',
        "ratelimit": '"session";r=7;t=2',  # t rounds the wait up to whole seconds
    }


def test_headers_for_session_and_user_windows_report_the_tighter_one() -> None:
    decision = Decision(
        Outcome.ADMITTED,
        Window(limit=10, remaining=8, wait_ms=30_000, reset_ms=60_000),
        Window(limit=5, remaining=1, wait_ms=12_000, reset_ms=59_000),
    )
    assert _headers(rate_limit_headers(decision, window_seconds=60)) == {
        # The OpenAI headers have room for one limit: the one closest to binding.
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "59s",
        # The IETF draft lists every policy and its state.
        "ratelimit-policy": '"session";q=10;w=60, "user";q=5;w=60',
        "ratelimit": '"session";r=8;t=30, "user";r=1;t=12',
    }


@pytest.mark.parametrize(
    "decision",
    [
        ADMIT_UNLIMITED,  # no window was consulted
        Decision(Outcome.REVOKED),
        Decision(Outcome.EXPIRED),
        Decision(Outcome.UNKNOWN),
    ],
)
def test_no_rate_limit_headers_without_a_window(decision: Decision) -> None:
    assert rate_limit_headers(decision, window_seconds=60) == []


# -- rejections ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (Outcome.REVOKED, "client_secret_revoked"),
        (Outcome.EXPIRED, "client_secret_expired"),
        (Outcome.UNKNOWN, "invalid_client_secret"),
    ],
)
def test_secret_rejections_are_401_with_their_code(outcome: Outcome, code: str) -> None:
    error = rejection(Decision(outcome), window_seconds=60)
    assert isinstance(error, AuthError)
    assert error.status == 401
    assert error.code == code
    assert error.headers == []
    body = json.loads(error.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


def test_admitted_decision_is_not_rejected() -> None:
    admitted = Decision(
        Outcome.ADMITTED, Window(limit=3, remaining=0, wait_ms=100, reset_ms=60_000)
    )
    assert rejection(admitted, window_seconds=60) is None


@pytest.mark.parametrize(
    ("wait_ms", "retry_after"),
    [
        (1, 1),  # never 0: clients would spin
        (999, 1),
        (1000, 1),
        (1001, 2),  # whole seconds round up, so retrying at Retry-After is never early
        (17_250, 18),
        (59_000, 59),  # the real wait, not a flat 60
        (60_000, 60),
    ],
)
def test_rate_limited_rejection_carries_the_real_wait(wait_ms: int, retry_after: int) -> None:
    decision = Decision(
        Outcome.RATE_LIMITED, Window(limit=7, remaining=0, wait_ms=wait_ms, reset_ms=60_000)
    )
    error = rejection(decision, window_seconds=60)
    assert isinstance(error, RateLimited)
    assert error.status == 429
    assert error.code == "rate_limit_exceeded"
    headers = _headers(error.headers)
    assert headers["retry-after"] == str(retry_after)
    assert int(headers["retry-after"]) == max(1, math.ceil(wait_ms / 1000))
    assert headers["retry-after-ms"] == str(wait_ms)
    assert headers["x-ratelimit-limit-requests"] == "7"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert headers["ratelimit-policy"] == '"session";q=7;w=60'
    assert headers["ratelimit"] == f'"session";r=0;t={math.ceil(wait_ms / 1000)}'
    body = json.loads(error.body())["error"]
    assert body["code"] == "rate_limit_exceeded"
    assert body["type"] == "rate_limit_error"
    assert "7 requests per 60 s" in body["message"]


def test_rate_limited_rejection_never_says_wait_zero() -> None:
    # A window reported as already free (wait 0) still gets a positive wait.
    decision = Decision(Outcome.RATE_LIMITED, Window(limit=1, remaining=0, wait_ms=0, reset_ms=0))
    error = rejection(decision, window_seconds=60)
    assert error is not None
    headers = _headers(error.headers)
    assert headers["retry-after"] == "1"
    assert int(headers["retry-after-ms"]) >= 1


def test_user_limit_rejection_reports_the_user_window() -> None:
    decision = Decision(
        Outcome.USER_RATE_LIMITED,
        Window(limit=10, remaining=6, wait_ms=2_000, reset_ms=50_000),
        Window(limit=5, remaining=0, wait_ms=41_200, reset_ms=58_000),
    )
    error = rejection(decision, window_seconds=60)
    assert isinstance(error, RateLimited)
    headers = _headers(error.headers)
    assert headers["retry-after"] == "42"  # the user's wait binds, not the session's
    assert headers["retry-after-ms"] == "41200"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "58s"
    assert headers["ratelimit-policy"] == '"session";q=10;w=60, "user";q=5;w=60'
    assert headers["ratelimit"] == '"session";r=6;t=2, "user";r=0;t=42'
    message = json.loads(error.body())["error"]["message"]
    assert "user allows 5 requests per 60 s" in message


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
    assert "ek_secret" not in str(caught.value)
