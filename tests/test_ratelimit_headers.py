"""Rate-limit headers and rejections: what a decision tells the client.

The OpenAI ``x-ratelimit-*`` headers, the IETF ``RateLimit``/``RateLimit-Policy``
pair and the error bodies of refused requests are pure functions of a
decision; the tables below are the specification, one row per case.
"""

from __future__ import annotations

import json
import math

import pytest

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

Headers = list[tuple[bytes, bytes]]


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
