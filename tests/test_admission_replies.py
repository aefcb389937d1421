"""admit.lua's reply, read back into a Decision (no Redis needed: the layout
is the script's contract, which the store tests hold against real Redis)."""

from __future__ import annotations

from typing import Any

from gateway.ratelimit import ClassWindow, Outcome, Window
from gateway.store.redis.batcher import decode_decision


def _reply(*, user: bytes = b"user_a", configuration: bytes = b"", outcome: int = 0) -> list[Any]:
    return [
        outcome,
        *(0, 0, 0, 0),  # the session limit does not count this class
        *(0, 0, 0, 0),  # no per-user cap
        *(b"s60", 120, 119, 60_000, 60_000),  # the class window
        b"cksess_1",
        user,
        b"wf_a",
        b"",
        2_000_000_000,
        0,
        configuration,
        b"app_1",
    ]


def test_a_reply_reads_into_its_windows_and_identity() -> None:
    decision = decode_decision(_reply(), "read", "m1")
    assert decision.outcome is Outcome.ADMITTED
    assert decision.session is None
    assert decision.user is None
    assert decision.class_window == ClassWindow(
        "read", "session", 60, Window(120, 119, 60_000, 60_000)
    )
    assert decision.identity is not None
    assert decision.identity.user == "user_a"
    assert decision.identity.app == "app_1"
    assert decision.member == "m1"


def test_a_sessions_identity_is_one_object_until_its_record_changes() -> None:
    first = decode_decision(_reply(), "read").identity
    assert decode_decision(_reply(), "read").identity is first
    changed = decode_decision(_reply(configuration=b'{"history":{"enabled":false}}'), "read")
    assert changed.identity is not first
    assert changed.identity is not None
    assert changed.identity.configuration == '{"history":{"enabled":false}}'
    assert changed.identity.user == "user_a"
    other_user = decode_decision(_reply(user=b"user_b"), "read").identity
    assert other_user is not None
    assert other_user.user == "user_b"


def test_a_refusal_keeps_no_member() -> None:
    assert (
        decode_decision(_reply(outcome=int(Outcome.CLASS_RATE_LIMITED)), "read", "m1").member == ""
    )
