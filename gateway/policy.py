"""A workflow's admission policy: which requests its sessions may make, how often.

Configured per workflow under ``"policy"`` in ``GATEWAY_WORKFLOWS``::

    {"session_limit_counts": "turn",
     "limits": {"turn": {"user": {"1d": 200}}, "read": {"session": {"1m": 120}}},
     "models": ["gpt-5-mini"],
     "limit_answer": "http"}

``limits`` maps a request class (:class:`gateway.chatkit.RequestClass`) to a
scope (``session``: one session; ``user``: every session of the session's
user) to a window (``1m``, ``1h``, ``1d``) to the number of requests admitted
in any such window. Classes not named keep their defaults (:data:`DEFAULT_LIMITS`),
so reads are never free. The policy is compiled once, at issue time, into the
session's record, so the store decides every window in one step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from gateway.chatkit import RequestClass
from gateway.model.budgets import BudgetFields

Scope = Literal["session", "user"]
WindowName = Literal["1m", "1h", "1d"]
WINDOW_SECONDS: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}

#: Per-session windows of the classes the session limit does not count, when a
#: workflow's policy does not say otherwise. Reads are generous (a page load
#: makes several) but bounded: each hits the ChatKit server's store.
DEFAULT_LIMITS: dict[RequestClass, dict[Scope, dict[WindowName, int]]] = {
    RequestClass.TURN: {},
    RequestClass.READ: {"session": {"1m": 120}},
    RequestClass.WRITE: {"session": {"1m": 60}},
    RequestClass.UPLOAD: {"session": {"1m": 10}},
    RequestClass.TRANSCRIBE: {"session": {"1m": 10}},
}

ClassLimits = dict[Scope, dict[WindowName, int]]


class Policy(BudgetFields):
    """One workflow's admission policy (the defaults are the issued default).

    Its token and dollar budgets (``tokens``, ``usd``,
    ``reserve_output_tokens``) are :class:`~gateway.model.budgets.BudgetFields`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Which class the session's ``rate_limits.max_requests_per_1_minute``
    #: counts: model turns (an issued session's default) or every request.
    session_limit_counts: Literal["turn", "all"] = "turn"
    limits: dict[RequestClass, ClassLimits] = Field(default_factory=dict)
    #: Models a turn may ask for (``params.input.inference_options.model``);
    #: None lets the server choose its default and any model the client names.
    models: tuple[str, ...] | None = None
    #: How a refused request is answered: a 429 JSON error, or (``chatkit``)
    #: for streaming requests a ChatKit ``error`` event the widget shows.
    limit_answer: Literal["http", "chatkit"] = "http"

    @field_validator("limits")
    @classmethod
    def _positive(cls, value: dict[RequestClass, ClassLimits]) -> dict[RequestClass, ClassLimits]:
        for name, scopes in value.items():
            for scope, windows in scopes.items():
                for window, count in windows.items():
                    if count < 1:
                        raise ValueError(
                            f"{name.value}.{scope}.{window} must be at least 1 (got {count})"
                        )
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or any(not m for m in value)):
            raise ValueError("models must list at least one non-empty model name")
        return value

    def windows(self) -> dict[str, str]:
        """The class windows compiled for a session record: class -> spec.

        A spec is comma-separated ``<s|u><seconds>:<limit>`` (scope, window
        length, limit), the form the admission script reads; a class with no
        window is absent.
        """
        compiled: dict[str, str] = {}
        for cls in RequestClass:
            scopes = self.limits.get(cls, DEFAULT_LIMITS[cls])
            parts = [
                f"{scope[0]}{WINDOW_SECONDS[window]}:{count}"
                for scope in ("session", "user")
                for window, count in sorted(
                    scopes.get(scope, {}).items(), key=lambda item: WINDOW_SECONDS[item[0]]
                )
            ]
            if parts:
                compiled[cls.value] = ",".join(parts)
        return compiled


class ClassWindow:
    """One compiled window, for the embedded store and for messages."""

    __slots__ = ("limit", "scope", "seconds")

    def __init__(self, scope: str, seconds: int, limit: int) -> None:
        self.scope = scope
        self.seconds = seconds
        self.limit = limit


def parse_spec(spec: str) -> list[ClassWindow]:
    """A compiled spec (see :meth:`Policy.windows`) back as windows."""
    windows = []
    for part in spec.split(","):
        if part:
            length, limit = part[1:].split(":")
            windows.append(
                ClassWindow("user" if part[0] == "u" else "session", int(length), int(limit))
            )
    return windows


def window_name(seconds: int) -> str:
    """``60`` -> ``1m``: the policy's name for a window length."""
    for name, length in WINDOW_SECONDS.items():
        if length == seconds:
            return name
    return f"{seconds}s"
